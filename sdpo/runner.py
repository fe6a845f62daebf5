"""The stepwise DPO runner: `sdpo train` from a config to T aligned checkpoints.

Step t trains on chunk t; its policy starts from M_{t-1} and its reference is M_{t-1}
(step 1: the initial model M0). The reference values of a chunk are computed once, with no
gradients, by the policy itself before its first update (so no second model is ever resident),
written to an on-disk cache, and training reads only the cache. The initial model's scoring pass
over all data is done once and serves three purposes: the easy-to-hard ranking, step 1's
reference values and the γ_ref report. With ``sdpo.reference`` naming another checkpoint, that
model is loaded (set up as the policy is: sharded under ``train.fsdp``), scores every chunk, is
written to the cache and freed before the policy loads.
``steps = 1`` is plain DPO over all data.

LoRA (``lora.rank > 0``, ``sdpo.engine.lora``): after M_{t-1} has scored step t's reference
values, a fresh adapter (seeded from ``train.seed`` and t) is attached and trained alone; at the
end of the step it is merged, so ``step-<t>/`` is the usual full checkpoint of M_t (the next
step's reference), and the adapter is also written in PEFT's layout to ``step-<t>/adapter/``.
A mid-step checkpoint then holds the adapter and the trainer state only: the frozen base is
M_{t-1} (``step-<t-1>/``, among the checkpoint's checksummed external files, or ``model.path``),
and its fingerprint is checked on resume. With ``train.fsdp`` the adapter is attached to the
sharded base, whole on every rank (so a mid-step checkpoint needs no gather), and merged into
each rank's shards before the step's weights are gathered for ``step-<t>/``.

Models (``model.implementation``): sdpo's own packed decoder runs the model types it
implements; any other causal LM is loaded with transformers and wrapped in ``PackedCausalLM``
(``sdpo.engine.hf``), with the same steps, checkpoints (the Hugging Face object's own names and
config), resume and LoRA. The settings that need sdpo's decoder are refused for it before
anything is written (``_check_implementation``).

Reliability. Every input (model folder, tokenizer, every data row, lengths against the model's
context) is checked before the output folder is touched, so bad input costs neither a run nor a
previous run's outputs. Training checkpoints (``OUTPUT_DIR/checkpoints/ckpt-<run_step>/``, see
``sdpo.engine.resume``) are written every ``train.save_every`` optimizer steps, at the end of each
sDPO step and on a graceful stop (SIGTERM/SIGINT); ``resume=True`` continues from the newest
complete one to the same bits as an uninterrupted run. A resume redoes the cheap deterministic
parts (reading data, partitioning, reference caches, which are reused when their keys match)
and restores the rest: a mid-step checkpoint holds the weights, the trainer state (optimizer,
schedule, RNG, plan position) and the run's progress; an end-of-step checkpoint holds the
progress (and the optimizer when it is kept across steps) and checksums ``step-<t>/``, whose
weights it relies on.

``train.async_save`` (``sdpo.engine.async_save``): at each save rank 0 copies what the
checkpoint holds into host memory and a background thread writes it while training goes on
(``_checkpoint``); the end of an sDPO step writes ``step-<t>/`` and its checkpoint as one such
write. One write is in flight at most (a save first waits for the previous one), and every way
out of the run waits for it and raises its error, so a failed write is never lost. Nothing
reads ``step-<t>/`` before its write has finished (``_save_step_end``).

Data parallel (launched with torchrun, ``sdpo.engine.distributed``): every rank checks the output
folder and every input itself, so a bad input raises the same error on every rank before anything
is written; the data alone is read, checked and tokenized by rank 0, which sends the pairs
(``tokenized_once``) or its error to every rank. Rank 0 alone writes (the output folder's
preparation, ``config.toml``, token and reference caches, ``metrics.jsonl``, checkpoints,
``step-<t>/``, reports); what the other ranks would read of it (a reference cache's values, the
resume point) rank 0 reads and broadcasts, and its write errors are broadcast too, so every rank
raises them. Scoring passes are sharded over ranks and gathered; the trainer divides each optimizer
step. ``--resume`` works with any number of ranks (rank 0 picks the checkpoint, every rank loads
it); the result is bitwise that of an uninterrupted run with the same number of ranks, and equal to
float rounding across different numbers. Sharded (``train.fsdp``): the weights and the optimizer
state are gathered onto rank 0 for every checkpoint (collectives every rank joins before rank 0
writes) in the plain form, so ``--resume`` continues a sharded run sharded or in one process. A
graceful stop (SIGTERM/SIGINT on any rank; torchrun forwards SIGTERM to every rank) is agreed in
the next step's all-reduce, so all ranks stop after the same optimizer step and rank 0 saves the
checkpoint. Fault points (``SDPO_FAULT_AT``) count per process: a point that only rank 0 reaches
(checkpoint and cache writes) kills rank 0 alone, and torchrun then ends the other ranks.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import json
import shutil
import signal
import tempfile
import threading
import time
import typing
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from safetensors.torch import save as safetensors_bytes

from sdpo.cache import (
    CacheKey,
    RefLogprobCache,
    RefValues,
    data_fingerprint,
    file_fingerprint,
    keyed_cache_path,
)
from sdpo.config import (
    ColumnMap,
    DataSource,
    RunConfig,
    SDPOSection,
    config_to_dict,
    step_settings,
    transformers_conflicts,
    write_resolved_config,
)
from sdpo.engine import distributed, sharding
from sdpo.engine.async_save import BackgroundWriter, HostSnapshot
from sdpo.engine.attention import BACKEND_NEEDS, WINDOW_NEEDS, available_attention_backends
from sdpo.engine.checkpoint import (
    CheckpointError,
    ModelInfo,
    architecture_differences,
    architecture_text,
    check_model,
    earlier_architecture_texts,
    earlier_model_fingerprints,
    fingerprint_with,
    load_model,
    load_pretrained,
    model_fingerprint,
    model_state_dict,
    pretrained_config,
    resolve_implementation,
    save_pretrained,
)
from sdpo.engine.compile import compile_decoder_layers
from sdpo.engine.data import DataError, read_preference_file, row_error
from sdpo.engine.files import append_jsonl, atomic_open, atomic_write_bytes, atomic_write_json
from sdpo.engine.hf import check_gradient_checkpointing, check_lora_layout
from sdpo.engine.hub import hub_snapshot, resolve_model_folder
from sdpo.engine.lora import (
    attach_lora,
    load_lora_state_dict,
    lora_state_dict,
    merge_lora,
    merge_rounding_loss,
    peft_adapter_files,
)
from sdpo.engine.packing import TokenizedPair
from sdpo.engine.precision import (
    emulated_bf16_warning,
    parameter_dtype,
    precision_problem,
    resolve_precision,
    resumed_precision,
)
from sdpo.engine.profiling import (
    StepProfiler,
    start_memory_history,
    stop_memory_history,
    write_memory_snapshot,
)
from sdpo.engine.resume import (
    checkpoint_name,
    fault_point,
    file_entries,
    find_resume_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    write_checkpoint,
)
from sdpo.engine.scoring import PairLogps, score_pairs
from sdpo.engine.token_cache import (
    Tokenized,
    keyed_token_cache_path,
    load_tokenized,
    pack_pairs,
    save_packed,
    save_tokenized,
    token_cache_changes,
    token_cache_key,
    token_cache_path,
    unpack_pairs,
)
from sdpo.engine.tokenize import (
    ADDED_TOKENS_FILE,
    CHAT_TEMPLATE_DIR,
    CHAT_TEMPLATE_FILE,
    PROCESSOR_CHAT_TEMPLATE_FILE,
    PairTokenizer,
    TokenizeStats,
    tokenize_pairs,
)
from sdpo.engine.trainer import (
    DPOTrainer,
    NonFiniteError,
    TrainConfig,
    TrainingStopped,
    build_optimizer,
    plan_steps,
)
from sdpo.kernels import resolve_impl
from sdpo.losses import dpo_loss
from sdpo.partition import describe_partition, partition_pairs, split_held_out
from sdpo.report import PLOT_HINT, StepReport, format_summary_table, plot_steps, write_reports
from sdpo.tracking import (
    TENSORBOARD_DIR,
    TRACKING_STATE,
    Trackers,
    TrackerStartError,
    missing_tracker_packages,
    open_trackers,
)

# copied into every step-<t>/ (and checkpoint model folder) so it loads (transformers'
# AutoTokenizer and AutoProcessor, sdpo) with the input model's tokenizer, chat templates and
# processor. added_tokens.json: where tokenizer_config.json has no added_tokens_decoder (folders
# saved before it existed), AutoTokenizer adds the tokens it names. The processor files are those
# AutoProcessor reads besides the tokenizer's (a multimodal model's image, video and audio ones);
# the subfolders of a processor's other tokenizers are copied too (processor_tokenizer_folders)
PROCESSING_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    ADDED_TOKENS_FILE,
    "generation_config.json",
    CHAT_TEMPLATE_FILE,
    PROCESSOR_CHAT_TEMPLATE_FILE,
    CHAT_TEMPLATE_DIR,  # named templates (tool_use.jinja, ...): a folder
    "processor_config.json",
    "preprocessor_config.json",  # an image processor's or feature extractor's
    "video_preprocessor_config.json",
    "audio_tokenizer_config.json",
)
CHECKPOINTS_DIR = "checkpoints"
PROGRESS_NAME = "progress.json"
TRAINER_STATE_NAME = "trainer_state.pt"
# LoRA: a mid-step checkpoint holds the adapter (names as in the model) instead of the weights
ADAPTER_STATE_NAME = "adapter.safetensors"
# LoRA: each step's adapter in PEFT's layout, inside step-<t>/
PEFT_ADAPTER_DIR = "adapter"
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
# [profile]: each rank's trace and summary (sdpo.engine.profiling)
PROFILE_DIR = "profile"
# Config keys that change how the work is computed, not what: a resume may change them (after
# running out of GPU memory, say), with a warning that the result then equals the uninterrupted
# run's up to float rounding (see rounding_only_keys).
RESUME_ROUNDING_KEYS = frozenset(
    {
        "model.gradient_checkpointing",
        "model.checkpoint_every",
        "model.compile",
        "model.activation_memory_budget",
        "model.attn_backend",
        "kernels.chunk_tokens",
        "kernels.max_chunk_tokens",
        "sdpo.score_tokens_per_batch",
    }
)
# Config keys that may change between a run and its resume: they do not change the weights
# (sdpo.report_scoring under a random or given partition only up to rounding: rounding_only_keys).
RESUME_SAFE_KEYS = frozenset(
    {
        "output_dir",
        "sdpo.cache_dir",
        "sdpo.report_scoring",
        "train.log_every",
        "train.save_every",
        "train.keep_checkpoints",
        "train.skip_nonfinite_batches",
        "train.eval_every",
        "train.async_save",
        "train.memory_probe",
        "log.report_to",
        "log.project",
        "log.run_name",
        "log.tensorboard_dir",
        "log.token_metrics",
        "profile.steps",
        "profile.start_step",
        "profile.sdpo_step",
        "profile.memory",
        "profile.with_stack",
        "profile.memory_on_oom",
    }
)


# the run's phase while a model loads (the out-of-memory message's advice depends on it)
LOADING = "loading the model"


class OutputDirError(RuntimeError):
    """The output folder does not fit the request (another run's outputs, a changed config)."""


class OutOfMemoryStop(RuntimeError):
    """The GPU ran out of memory: the message says in which phase, which settings bound the
    memory there and how to continue (training checkpoints written so far are intact).
    ``settings_may_change``: a resume may change settings that bound this phase's memory
    (not so while a model loads: its dtype and sharding are fixed for the run)."""

    def __init__(self, message: str, *, settings_may_change: bool = True) -> None:
        super().__init__(message)
        self.settings_may_change = settings_may_change


class RunInputError(ValueError):
    """Bad input (model folder, tokenizer, data) found before training; nothing was written."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, permissions); older ones are intact."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C ended the run at once: while the inputs were read and checked (before the
    graceful-stop handler, ``_stop_signals``, is installed), or a second Ctrl-C during a
    graceful stop. ``wrote``: this run had begun writing in the output folder (its
    preparation is done whole, ``_interrupt_deferred``; what is there then is what
    ``--resume`` continues from); ``checkpoint``: the newest training checkpoint on disk, if
    any. Files being written when it struck were temporary and are removed."""

    def __init__(self, *, wrote: bool, checkpoint: str | None) -> None:
        super().__init__()
        self.wrote = wrote
        self.checkpoint = checkpoint


@contextlib.contextmanager
def _interrupt_deferred() -> Iterator[None]:
    """A Ctrl-C inside the block takes effect at its end (main thread only): the output
    folder's preparation (an old run's outputs cleared by ``--overwrite``, token caches and
    ``config.toml`` written) is never left half done."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    old = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
    if received:
        raise KeyboardInterrupt


@dataclass(kw_only=True)
class RunResult:
    output_dir: Path
    reports: list[StepReport] = field(default_factory=list)
    scoring_calls: int = 0


@dataclass(kw_only=True)
class ResumePoint:
    """The checkpoint a resumed run continues from (``progress`` is its progress.json)."""

    path: Path
    progress: dict[str, Any]

    def trainer_state(self) -> dict[str, Any] | None:
        file = self.path / TRAINER_STATE_NAME
        return torch.load(file, weights_only=True) if file.is_file() else None


def _log(message: str) -> None:
    if distributed.is_main():
        print(f"[sdpo] {message}", flush=True)


def model_folder(value: str, *, key: str, revision: str | None = None) -> Path:
    """The local folder of a model value (``engine.hub``): rank 0 fetches a hub model, the
    other ranks then find it in the same hub cache (one node, one file system). A collective
    under torchrun; raises ``RunInputError``."""
    try:
        folder = Path(on_main(lambda: str(resolve_model_folder(value, revision=revision, key=key))))
    except ValueError as e:
        raise RunInputError(str(e)) from e
    if folder == Path(value).expanduser() and not folder.is_dir():
        what = "is a file, not a folder" if folder.is_file() else "does not exist"
        full = "" if str(folder.absolute()) == str(value) else f" ({folder.absolute()})"
        raise RunInputError(
            f"{key} = {str(value)!r}{full} {what}; give the path of a Hugging Face "
            "model folder (config.json, *.safetensors, tokenizer.json), or a hub model id "
            "(namespace/name)"
        )
    if hub_snapshot(value, folder) is not None:
        _log(f"{key} {value}: hub snapshot {folder.name} ({folder})")
        if not folder.is_dir():
            raise RunInputError(
                f"{key} = {value!r}: rank {distributed.rank()} does not see the hub snapshot "
                f"rank 0 fetched ({folder}); give every rank the same hub cache (HF_HUB_CACHE "
                "on a shared file system) or a local model folder"
            )
    return folder


def select_device() -> torch.device:
    """The run's device: ``cuda:LOCAL_RANK`` in a process group, else the current CUDA device
    (a group formed without ``LOCAL_RANK`` too: see ``distributed.cuda_index``), by its index,
    so that what the run asks of it later, such as its memory counters, is about that GPU even
    if the current device changes; else the CPU."""
    return distributed.device()


def on_main(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 only and give every rank its result, or raise its exception on every
    rank (a collective: every rank calls it at the same point). In one process: ``fn()``."""
    if not distributed.active():
        return fn()
    outcome: tuple[bool, Any] = (True, None)
    if distributed.is_main():
        try:
            outcome = (True, fn())
        except Exception as e:  # handed to every rank, then raised on each
            outcome = (False, e)
    try:
        ok, value = distributed.broadcast_object(outcome)
    except Exception as e:  # an exception that does not pickle
        if not outcome[0]:
            raise outcome[1] from e
        raise
    if not ok:
        raise value
    return value


def load_pairs(
    cfg: RunConfig,
    tokenizer: PairTokenizer,
    *,
    vocab_size: int,
    context_length: int | None = None,
    places: dict[int, str] | None = None,
    sources: Sequence[DataSource] | None = None,
    cache_file: Path | None = None,
    pending_saves: list[Callable[[], None]] | None = None,
    tokenizer_dir: str | Path | None = None,
    cache_changes: list[str] | None = None,
    shared_cache: bool = False,
    changes_since: Path | None = None,
    cache_used: list[Path] | None = None,
) -> list[TokenizedPair]:
    """Read, validate and tokenize every source; pair ``index`` is the position in the pool.
    With ``context_length`` (the model's ``max_position_embeddings``) a pair whose sequence
    would not fit the model's context is an error naming its row. ``places`` receives each
    pair's "file line N" / "file row N" for later messages. With ``cache_file`` the pairs come
    from that token cache when its key matches (``sdpo.engine.token_cache``); otherwise they
    are tokenized and the cache written once every check passed (appended to ``pending_saves``
    when given, so the caller writes only after all its inputs passed). ``tokenizer_dir``: the
    folder of the tokenizer files in the cache key (default ``model.path``; a hub model's
    snapshot folder). ``cache_changes`` receives, where an existing cache is not reused, what
    changed since it was written (``token_cache_changes``; rank 0's), or since
    ``changes_since`` was, where given (the file a resumed run's checkpoint names). The file of
    the key's digest (``tokens-train-<digest>``) is read first, then ``cache_file``;
    ``shared_cache`` (a folder runs share) writes the digest's name, else ``cache_file``.
    ``cache_used`` receives the path of the file read or written."""
    # the held-out pairs' line says so: two "data:" lines in a row would not say which is which
    what = "held-out data" if sources is not None and sources == cfg.data.eval_sources else "data"
    sources = cfg.data.sources if sources is None else sources
    # data parallel: the arrays rank 0 packed for the other ranks, which the cache write reuses
    packed: dict[str, Any] = {}

    def read() -> Tokenized:
        d = cfg.data
        key = None
        if cache_file is not None:
            key = token_cache_key(
                sources,
                tokenizer_dir=cfg.model.path if tokenizer_dir is None else tokenizer_dir,
                max_length=d.max_length,
                max_prompt_length=d.max_prompt_length,
                truncation=d.truncation,
                identical_pairs=d.identical_pairs,
                vocab_size=vocab_size,
                context_length=context_length,
                tokenizer_fingerprint=tokenizer.fingerprint,
            )
        cached, reason, target = None, "no key", cache_file
        if key is not None:
            own = keyed_token_cache_path(cache_file, key)
            target = own if shared_cache else cache_file
            reasons = []  # the key's own file first, then the plain name
            for path in (own, cache_file):
                cached, why = load_tokenized(path, key)
                if cached is not None:
                    _log(f"token cache {path.name}: reused")
                    if cache_used is not None:
                        cache_used.append(path)
                    return cached
                reasons.append(why)
            own_reason, reason = reasons
            if own_reason != "missing":  # the key's own file, damaged
                _log(f"token cache {own.name}: tokenizing again ({own_reason})")
            elif shared_cache:
                _log(f"token cache {own.name}: none for this key yet; tokenizing")
            elif reason != "missing":
                _log(f"token cache {cache_file.name}: tokenizing again ({reason})")
            if cache_changes is not None:  # [] where the file is missing
                # the file a resumed run's checkpoint names, even when gone: the plain name in
                # a shared folder is another run's
                since = cache_file if changes_since is None else changes_since
                cache_changes.extend(token_cache_changes(since, key))
            if cache_used is not None:
                cache_used.append(target)
        tokenized = _read_and_tokenize(
            cfg, tokenizer, sources, vocab_size=vocab_size, context_length=context_length
        )
        if key is not None:
            packed["wanted"] = True
            save = partial(_save_token_cache, target, tokenized, key, packed)
            if pending_saves is not None:
                pending_saves.append(save)
            else:
                save()
        return tokenized

    def keep(arrays: dict[str, np.ndarray], names: list[str]) -> None:
        if packed.get("wanted"):
            packed["arrays"] = (arrays, names)

    pairs, row_places, stats = tokenized_once(read, on_packed=keep)
    if places is not None:
        places.update(row_places)
    _log(
        f"{what}: {len(pairs)} pairs from {len(sources)} source(s); "
        f"{stats.num_truncated} truncated to max_length={cfg.data.max_length}"
    )
    if stats.num_identical:
        _log(
            f"data: {stats.num_identical} pair(s) have identical chosen and rejected token ids "
            "(the same text kept by data.identical_pairs, or cut to the same tokens by "
            "data.max_length / data.max_prompt_length): they carry no training signal and "
            "their γ is 0, which counts as hard in an easy-to-hard partition"
        )
    if stats.num_prompt_boundary:
        _log(
            f"data: in {stats.num_prompt_boundary} pair(s) the prompt's tokens are not a prefix "
            "of prompt + completion's: plain rows whose completion does not start with a space "
            "or newline (tokens merge across the boundary; each completion is then encoded on "
            "its own), or a chat template that renders the prompt alone differently (the "
            "completion starts where the two part)"
        )
    return pairs


def tokenized_once(
    read: Callable[[], Tokenized],
    *,
    on_packed: Callable[[dict[str, np.ndarray], list[str]], None] | None = None,
) -> Tokenized:
    """``read()`` (read, check and tokenize data, or load its token cache) on rank 0 alone, its
    result on every rank: a collective under torchrun, so the CPU work and the memory peak of
    tokenizing are paid once per run, not once per rank, and the other ranks need neither the
    data files nor the cache (another node's file system will do). ``read``'s exception is
    raised on every rank (``on_main``). The pairs travel as flat arrays (``pack_pairs``: a few
    tensor broadcasts, no pickled lists of ints); every rank ends with the same pairs in the
    same order and the places of exactly those pairs. ``on_packed`` receives rank 0's packed
    arrays and source names (for a token cache write to reuse). In one process: ``read()``."""
    if not distributed.active():
        return read()
    held: dict[str, Any] = {}

    def main() -> tuple[list[str], TokenizeStats]:
        pairs, places, stats = read()
        held["arrays"], names = pack_pairs(pairs, places)
        if on_packed is not None:
            on_packed(held["arrays"], names)
        held["pairs"], held["places"] = pairs, places
        return names, stats

    names, stats = on_main(main)
    arrays = distributed.broadcast_arrays(held.pop("arrays", None))
    if distributed.is_main():
        pairs, places = held["pairs"], held["places"]
        return pairs, {p.index: places.get(p.index, "") for p in pairs}, stats
    pairs, places = unpack_pairs(arrays, names)
    return pairs, places, stats


def _save_token_cache(
    path: Path, tokenized: Tokenized, key: dict[str, Any], packed: dict[str, Any]
) -> None:
    """Write the token cache: of the arrays already packed for the other ranks when there are
    (``packed["arrays"]``, dropped once written), else of the pairs."""
    pairs, places, stats = tokenized
    try:
        arrays = packed.pop("arrays", None)
        if arrays is not None:
            save_packed(path, *arrays, stats, key)
        else:
            save_tokenized(path, pairs, places, stats, key)
    except OSError as e:  # the cache only saves time: a run goes on without it
        _log(f"token cache {path.name} not written ({e.strerror or e})")


def _read_and_tokenize(
    cfg: RunConfig,
    tokenizer: PairTokenizer,
    sources: Sequence[DataSource],
    *,
    vocab_size: int,
    context_length: int | None,
) -> tuple[list[TokenizedPair], dict[int, str], TokenizeStats]:
    rows = []
    for source in sources:
        rows.extend(
            read_preference_file(
                source.path,
                source=source.name,
                split=source.split,
                subset=source.subset,
                identical=cfg.data.identical_pairs,
                columns=source.columns.as_dict(),
            )
        )
    pairs, stats = tokenize_pairs(
        rows,
        tokenizer,
        max_length=cfg.data.max_length,
        max_prompt_length=cfg.data.max_prompt_length,
        truncation=cfg.data.truncation,
        vocab_size=vocab_size,
    )
    places: dict[int, str] = {}
    for i, row in enumerate(rows):
        unit = "line" if row.get("row_label") == "line" else "row"
        places[i] = f"{row.get('file')} {unit} {row.get('row')}"
    if context_length is not None:
        for pair in pairs:
            length = len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids))
            if length > context_length:
                # the field at fault: the prompt when it alone fills the context, else the
                # longer completion, which runs past it
                longer = "chosen" if len(pair.chosen_ids) >= len(pair.rejected_ids) else "rejected"
                field = "prompt" if len(pair.prompt_ids) >= context_length else longer
                raise row_error(
                    rows[pair.index],
                    f"the pair is {length} tokens long ({len(pair.prompt_ids)} of prompt), "
                    f"longer than the model's context (max_position_embeddings "
                    f"{context_length})",
                    fix=f"set data.max_length <= {context_length} (longer rows are then "
                    "truncated), or shorten or remove the row",
                    field=field,
                    position=pair.index,
                )
    return pairs, places, stats


class StepwiseRunner:
    """Runs the T DPO steps of one sDPO configuration (see the module docstring)."""

    def __init__(
        self,
        cfg: RunConfig,
        *,
        progress: bool = True,
        overwrite: bool = False,
        resume: bool = False,
    ) -> None:
        if not isinstance(cfg, RunConfig):  # a dict or a path failed on its first field read
            raise TypeError(
                f"the runner takes a sdpo.config.RunConfig, got {type(cfg).__qualname__}: build "
                "it with sdpo.config.load_config(path) from a TOML file or "
                "sdpo.config.config_from_dict(d) from a dict"
            )
        self.cfg = cfg
        self.progress = progress
        self.overwrite = overwrite
        self.resume = resume
        self.out = Path(cfg.output_dir)
        self.device = select_device()
        self.precision = resolve_precision(cfg.train.precision, self.device)
        self.impl = resolve_impl(cfg.kernels.impl, self.device)
        cache_dir = cfg.sdpo.cache_dir or (self.out / "cache")
        self.cache_dir = Path(cache_dir)
        # a folder runs share (sdpo.cache_dir) holds a file per key, named by the key's digest;
        # the run's own (OUTPUT_DIR/cache) one file per name, replaced when the key changes
        self.shared_cache = bool(cfg.sdpo.cache_dir)
        self.scoring_calls = 0
        self.tokenizer_fp = ""
        self.stop_flag = False
        self.in_optimizer_steps = False  # inside DPOTrainer.fit: a stop ends after a step
        self.trainer: DPOTrainer | None = None  # the one in fit, which says after which step
        # inside DPOTrainer.fit, the run step after which a train.eval_every pass is running
        self.evaluating_after: int | None = None
        self.wrote_outputs = False  # this run began writing in output_dir (RunInterrupted)
        self.last_checkpoint: Path | None = None
        # M_{t-1}'s step-<t-1>/ files: the external manifest entries of step t's checkpoints
        self.weights_files: dict[str, Any] = {}
        # train.async_save, rank 0: the writer thread and the host copies it writes from
        self.writer: BackgroundWriter | None = None
        self.host_copies = HostSnapshot()
        self._rows_of_pairs: dict[int, str] = {}
        self.eval_pairs: list[TokenizedPair] = []
        # the report's account of the held-out pairs: the rows data.eval_fraction drew, and how
        # many of data.eval_sources' pairs are also training pairs
        self.held_out_rows: list[str] = []
        self.held_out_overlap = 0
        self.eval_initial: PairLogps | None = None
        self.trackers = Trackers()  # rank 0, with log.report_to: TensorBoard / W&B
        self.data_fp: str | None = None  # data_fingerprint of the training pairs (run())
        # what changed since the training data's token cache was written, where it was not
        # reused (load_pairs' cache_changes): names the cause of other token ids on resume
        self.token_cache_changes: list[str] = []
        # the training data's token cache: the file this run read or wrote (kept in its
        # checkpoints), and the one a resumed run's checkpoint names (rank 0)
        self.token_cache_file: list[Path] = []
        self.resumed_token_cache: str | None = None
        self._data_fp_of: Sequence[TokenizedPair] | None = None  # the pairs data_fp hashes
        # model.path and sdpo.reference as local folders (hub models: their snapshots), set by
        # load_inputs
        self.model_dir = Path(cfg.model.path) if cfg.model.path else Path()
        self.reference_dir: Path | None = None
        self.pending_cache_saves: list[Callable[[], None]] = []  # load_inputs' token caches
        self.model_fps: dict[str, str] = {}  # role ("initial", "reference") -> weights' fingerprint
        # role -> the architecture text its fingerprint hashed (architecture_text): a resume
        # refused for other weights tells the tensors from the configuration by it
        self.model_archs: dict[str, str] = {}
        # fingerprint -> the fingerprints earlier releases gave those weights (hashed once)
        self._earlier_fps: dict[str, list[str]] = {}
        self.chunks: list[list[int]] | None = None  # the pair indices of each sDPO step (run())
        self.phase = LOADING  # what the run is doing, for an out-of-memory message
        # the code that runs the policy (model.implementation resolved by load_inputs), and its
        # logit soft-cap (Gemma 2; None: the usual log-prob head)
        self.implementation = "sdpo"
        self.logit_softcap: float | None = None
        self.router_loss = False  # model.path is a mixture of experts with its router loss on

    # -- scoring and the cache -----------------------------------------------------------
    @property
    def scores_chunk_one_only(self) -> bool:
        """The initial model scores chunk 1 alone: the partition does not rank by its values
        (random, given) and the report asks for no scoring beyond the reference values."""
        return self.cfg.sdpo.partition in ("random", "given") and not self.cfg.sdpo.report_scoring

    def score(
        self,
        model: torch.nn.Module,
        pairs: Sequence[TokenizedPair],
        *,
        aligned: bool = False,
        raw: bool = False,
        stats: bool = False,
        router_loss: bool = False,
    ) -> PairLogps:
        """The scoring pass with the run's settings; ``aligned``: with WPO's sums too; ``raw``:
        with LD-DPO's unweighted sums too; ``stats``: with the token metrics' sums too;
        ``router_loss``: with each batch's router loss too (a mixture of experts)."""
        self.scoring_calls += 1
        budget = self.cfg.sdpo.score_tokens_per_batch or 4 * self.cfg.train.max_tokens_per_batch
        how = "" if self.cfg.sdpo.score_tokens_per_batch else ", 4 x train.max_tokens_per_batch"
        self.phase = (
            f"scoring {len(pairs)} pairs without gradients, in batches of up to {budget} tokens "
            f"(sdpo.score_tokens_per_batch{how})"
        )
        return score_pairs(
            model,
            pairs,
            max_tokens_per_batch=budget,
            impl=self.impl,
            chunk_tokens=self.cfg.kernels.chunk_tokens,
            precision=self.precision,
            progress=self.progress,
            share_prompt=self.cfg.train.share_prompt,
            ld_alpha=self.cfg.loss.ld_alpha,
            return_aligned=aligned,
            return_raw=raw,
            return_stats=stats,
            return_router_loss=router_loss,
        )

    def cache_key(self, model_fp: str, pairs: Sequence[TokenizedPair]) -> CacheKey:
        d = self.cfg.data
        return CacheKey(
            model_fingerprint=model_fp,
            data_fingerprint=self._pairs_fingerprint(pairs),
            tokenizer_fingerprint=self.tokenizer_fp,
            max_length=d.max_length,
            max_prompt_length=d.max_prompt_length or 0,
            truncation=d.truncation,
            dtype_policy=self.precision,
            kernels_impl=self.impl,
            share_prompt=self.cfg.train.share_prompt,
            ld_alpha=self.cfg.loss.ld_alpha,  # 1 and unset give one key (CacheKey's rule)
            # FSDP's bf16 parameters round otherwise than autocast over whole fp32 ones
            sharded_bf16_params=(
                self.precision == "bf16-mixed" and sharding.wanted(self.cfg.train.fsdp)
            ),
        )

    def _pairs_fingerprint(self, pairs: Sequence[TokenizedPair]) -> str:
        """``data_fingerprint(pairs)``; of the training pairs themselves, the one ``run`` took
        (hashing every token id of a large data set takes seconds)."""
        if pairs is self._data_fp_of and self.data_fp is not None:
            return self.data_fp
        return data_fingerprint(pairs)

    def cached_reference(
        self, name: str, model: torch.nn.Module, model_fp: str, pairs: Sequence[TokenizedPair]
    ) -> PairLogps:
        """Reference values of ``pairs`` under ``model``, from the cache file ``name`` when its
        key and checksum match, else computed and written. The file of the key's digest
        (``initial-<digest>``, what a shared ``sdpo.cache_dir`` holds) is read first, then the
        plain name (``initial``: the run's own cache folder, and files of earlier releases);
        the values are written under the digest's name in a shared folder, else the plain
        one (``shared_cache``). A file written under a fingerprint an earlier release gave the
        same weights (``_earlier_fingerprints``) is reused, by either name."""
        key = self.cache_key(model_fp, pairs)
        plain = RefLogprobCache(self.cache_dir / f"{name}.safetensors")
        own = RefLogprobCache(keyed_cache_path(plain.path, key))
        target = own if self.shared_cache else plain
        reasons = []  # the key's own file first, then the plain name
        for cache in (own, plain):
            values, why = on_main(lambda c=cache: c.load(key))  # rank 0 reads, all ranks get it
            if values is not None:
                _log(f"reference cache {cache.path.name}: reused")
                return values.to_pair_logps()
            reasons.append(why)
        own_reason, reason = reasons
        # a shared folder's files of other keys under this name: one may be an earlier
        # release's for these weights, named by the digest of the key it fingerprinted them in
        others = self.shared_cache and on_main(
            lambda: any(p != own.path for p in self.cache_dir.glob(f"{name}-*.safetensors"))
        )
        if others or reason.startswith("key mismatch: model_fingerprint "):
            # a file an earlier release wrote for these weights, which it fingerprinted otherwise
            for earlier in self._earlier_fingerprints(model, model_fp):
                earlier_key = dataclasses.replace(key, model_fingerprint=earlier)
                for cache in (RefLogprobCache(keyed_cache_path(plain.path, earlier_key)), plain):
                    values, _ = on_main(lambda c=cache, k=earlier_key: c.load(k))
                    if values is not None:
                        _log(
                            f"reference cache {cache.path.name}: reused (written under the "
                            f"fingerprint {earlier[:12]} an earlier release gave these weights)"
                        )
                        return values.to_pair_logps()
        if own_reason != "missing":  # the key's own file, damaged
            _log(f"reference cache {own.path.name}: recomputing ({own_reason})")
        elif self.shared_cache:
            _log(f"reference cache {own.path.name}: none for this key yet; scoring")
        elif reason != "missing":
            _log(f"reference cache {plain.path.name}: recomputing ({reason})")
        scores = self.score(model, pairs)  # data parallel: sharded, gathered on every rank
        fault_point("score_done")
        if distributed.is_main():
            target.save(RefValues.from_scores(scores), key)
            fault_point("cache_saved")
        return scores

    # -- inputs and the output folder ----------------------------------------------------
    def load_inputs(self) -> tuple[PairTokenizer, list[TokenizedPair]]:
        """Check the model folder(s), the tokenizer and every data row; write nothing (the
        token caches wait in ``self.pending_cache_saves`` until the output folder is accepted).
        Any problem is a ``RunInputError`` naming the file, row/key and the fix."""
        cfg = self.cfg
        cache_saves: list[Callable[[], None]] = []  # written once every input passed
        self.pending_cache_saves = cache_saves
        try:
            self.model_dir = model_dir = model_folder(
                cfg.model.path, revision=cfg.model.revision, key="model.path"
            )
            model_config = check_model(
                model_dir,
                cfg.model.implementation,
                router_aux_loss_coef=cfg.loss.router_aux_loss_coef,
                router_key="loss.router_aux_loss_coef",
            )
            self._check_implementation(model_config, "model.path")
            # a mixture of experts trained with its router loss (a resume's warning names it)
            self.router_loss = bool(model_config.router_aux_loss_coef)
            self._check_attention_backend()
            self._warn_idle_recompute_setting()
            if cfg.sdpo.reference:
                self.reference_dir = model_folder(
                    cfg.sdpo.reference, revision=cfg.sdpo.reference_revision, key="sdpo.reference"
                )
                ref_config = check_model(self.reference_dir, cfg.model.implementation)
                self._check_implementation(ref_config, "sdpo.reference")
                if ref_config.vocab_size != model_config.vocab_size:
                    raise RunInputError(
                        f"sdpo.reference {cfg.sdpo.reference} has vocab_size "
                        f"{ref_config.vocab_size} but model.path {model_dir} has "
                        f"{model_config.vocab_size}: a reference must share the policy's "
                        "tokenizer; point sdpo.reference to a checkpoint of the same family"
                    )
            tokenizer = PairTokenizer.from_dir(model_dir)
            if self.reference_dir is not None:
                _check_same_vocabulary(
                    model_dir,
                    self.reference_dir,
                    tokenizer=tokenizer,
                    vocab_size=model_config.vocab_size,
                )
            # the tokens only added_tokens.json names: a row that holds one past the embedding
            # table is refused by tokenize_pairs, naming it
            own_size = tokenizer.vocab_size - len(tokenizer.added_file_tokens)
            if own_size > model_config.vocab_size:
                raise RunInputError(
                    f"{model_dir / 'tokenizer.json'} has {own_size} tokens but "
                    f"{model_dir / 'config.json'} vocab_size is {model_config.vocab_size}: the "
                    "tokenizer does not belong to this model (ids past the embedding table); "
                    "copy the tokenizer files that came with these weights"
                )
            pairs = load_pairs(
                cfg,
                tokenizer,
                vocab_size=model_config.vocab_size,
                context_length=model_config.max_position_embeddings,
                places=self._rows_of_pairs,
                cache_file=token_cache_path(self.cache_dir, "train"),
                pending_saves=cache_saves,
                tokenizer_dir=model_dir,
                cache_changes=self.token_cache_changes,
                shared_cache=self.shared_cache,
                changes_since=(
                    self.cache_dir / self.resumed_token_cache if self.resumed_token_cache else None
                ),
                cache_used=self.token_cache_file,
            )
            fault_point("data_read")
            self.eval_pairs = []
            if cfg.data.eval_sources:
                self.eval_pairs = load_pairs(
                    cfg,
                    tokenizer,
                    vocab_size=model_config.vocab_size,
                    context_length=model_config.max_position_embeddings,
                    sources=cfg.data.eval_sources,
                    cache_file=token_cache_path(self.cache_dir, "eval"),
                    pending_saves=cache_saves,
                    tokenizer_dir=model_dir,
                    shared_cache=self.shared_cache,
                )
            elif cfg.data.eval_fraction:
                pairs, self.eval_pairs = split_held_out(
                    pairs, fraction=cfg.data.eval_fraction, seed=cfg.train.seed
                )
                self.held_out_rows = [
                    self._rows_of_pairs.get(p.index, f"pair {p.index}") for p in self.eval_pairs
                ]
                _log(
                    f"held out {len(self.eval_pairs)} of {len(pairs) + len(self.eval_pairs)} "
                    f"pairs for evaluation (data.eval_fraction = {cfg.data.eval_fraction})"
                )
            self._check_sliding_window(model_config, "model.path", pairs)
            if cfg.sdpo.reference:
                self._check_sliding_window(ref_config, "sdpo.reference", pairs)
        except RunInputError:
            raise
        except (DataError, CheckpointError, ValueError, OSError) as e:
            raise RunInputError(str(e)) from e
        self._check_partition_fits(pairs)
        if cfg.data.eval_sources and distributed.is_main():  # a log line: rank 0's
            self.held_out_overlap = _warn_eval_overlap(pairs, self.eval_pairs)
        self.tokenizer_fp = file_fingerprint(model_dir / "tokenizer.json")
        return tokenizer, pairs

    def _check_implementation(self, info: ModelInfo, key: str) -> None:
        """Refuse, before any work, the settings a model run with transformers cannot honour
        (``transformers_conflicts``; LoRA where its projections are not where sdpo attaches
        adapters), and say once that transformers runs it when ``"auto"`` chose so."""
        if key == "model.path":
            self.implementation = info.implementation
            self.logit_softcap = info.logit_softcap
        if info.implementation != "transformers":
            return
        how = (
            'model.implementation = "transformers"'
            if self.cfg.model.implementation == "transformers" or info.unsupported is None
            else f'{info.unsupported} (model.implementation = "auto")'
        )
        conflicts = transformers_conflicts(self.cfg)
        if conflicts:
            raise RunInputError(
                f"{key}: {how}, so transformers runs this model, and these settings need sdpo's "
                f"own decoder: {', '.join(conflicts)}; remove them"
            )
        if self.cfg.lora.enabled and key == "model.path":
            try:
                check_lora_layout(self.model_dir, targets=self.cfg.lora.targets)
            except (TypeError, ValueError) as e:
                raise RunInputError(f"lora.rank = {self.cfg.lora.rank} with {how}: {e}") from e
        if self.cfg.model.gradient_checkpointing and key == "model.path":
            try:
                check_gradient_checkpointing(self.model_dir)
            except (KeyError, ValueError) as e:
                raise RunInputError(f"model.gradient_checkpointing with {how}: {e}") from e
        if distributed.is_main():
            _log(
                f"{key}: {how}; running it with transformers (AutoModelForCausalLM), each "
                "sequence padded to the longest of its batch (slower than sdpo's packed decoder "
                "on uneven lengths)"
            )
            if info.logit_softcap is not None and key == "model.path":
                _log(
                    f"{key}: its logits are soft-capped (final_logit_softcapping = "
                    f"{info.logit_softcap:g}): log-probs from sdpo's PyTorch head for capped "
                    "logits, on the plain loss path (slower than the Triton head; "
                    "train.loss_path, kernels.impl and kernels.max_chunk_tokens do not apply)"
                )

    def _warn_idle_recompute_setting(self) -> None:
        """``model.checkpoint_every`` picks which layers gradient checkpointing recomputes: with
        it off the key does nothing, whichever code runs the model. Said, not refused: a run's
        saved config.toml may hold it (from a run with checkpointing on, resumed with it off, a
        key that may change)."""
        every = self.cfg.model.checkpoint_every
        if every != 1 and not self.cfg.model.gradient_checkpointing:
            _log(
                f"warning: model.checkpoint_every = {every} does nothing while "
                "model.gradient_checkpointing is false (every layer keeps its activations); "
                "set model.gradient_checkpointing = true for it to apply (one layer in "
                f"{every} recomputed), or leave model.checkpoint_every out"
            )

    def _check_attention_backend(self) -> None:
        """Refuse, before any work, a ``model.attn_backend`` this machine cannot run (a CUDA
        kernel on a CPU, or one not installed) or that cannot take the precision's inputs (the
        flash kernels take no fp32); the decoder would otherwise stop at its first forward,
        after the output folder was written. A model transformers runs has refused any backend
        but ``"auto"`` already."""
        backend = self.cfg.model.attn_backend
        if backend in ("auto", "sdpa"):
            return
        usable = available_attention_backends(self.device)
        if backend not in usable:
            raise RunInputError(
                f"model.attn_backend = {backend!r} needs {BACKEND_NEEDS[backend]}, and this run is on "
                f"{self.device.type} (usable here: {', '.join(usable)}); set "
                'model.attn_backend = "auto" (the fastest backend this machine has) or one of '
                "those"
            )
        if self.precision == "fp32":  # no autocast: the attention inputs are fp32
            raise RunInputError(
                f"model.attn_backend = {backend!r} takes bf16 or fp16 inputs, and "
                f'train.precision = "{self.cfg.train.precision}" runs in fp32; set '
                'train.precision = "bf16-mixed" (or "bf16"), or model.attn_backend = "auto", '
                "which runs fp32 with SDPA"
            )

    def _check_sliding_window(self, info: ModelInfo, key: str, pairs: list[TokenizedPair]) -> None:
        """Refuse, before any work, a pair longer than the sliding window of a model sdpo's
        decoder runs when the named ``model.attn_backend`` cannot apply a window (an older
        flash-attn or ``varlen_attn``; ``"auto"`` skips such a kernel, and SDPA applies every
        window): its first forward would stop after the output folder was written."""
        window, backend = info.sliding_window, self.cfg.model.attn_backend
        if window is None or backend in ("auto", "sdpa"):
            return
        if backend in available_attention_backends(self.device, sliding_window=True):
            return
        held = [(pair, False) for pair in self.eval_pairs]
        for pair, trained in [*((pair, True) for pair in pairs), *held]:
            length = len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids))
            if length > window:
                where = (
                    self._rows_of_pairs.get(pair.index, f"pair {pair.index}")
                    if trained
                    else f"held-out pair {pair.index} of source {pair.source!r}"
                )
                raise RunInputError(
                    f"{where}: the pair is {length} tokens long, longer than the sliding_window "
                    f"({window}) of {key}, and model.attn_backend = {backend!r} cannot apply a "
                    f"window here (it needs {WINDOW_NEEDS[backend]}): set "
                    'model.attn_backend = "auto" (which skips it for the sliding layers) or '
                    f'"sdpa", or data.max_length <= {window}'
                )

    def _check_partition_fits(self, pairs: list[TokenizedPair]) -> None:
        """The partition's structural checks (pairs per step, one chunk per source, no source
        left empty), before anything is written: the real partition comes after the initial
        model's scoring pass, inside the run."""
        cfg = self.cfg
        if cfg.data.eval_fraction:
            left = {p.source for p in pairs}
            emptied = [s.name for s in cfg.data.sources if s.name not in left]
            if emptied:
                raise RunInputError(
                    f"data.eval_fraction = {cfg.data.eval_fraction} held out every pair of "
                    f"source(s) {emptied}, leaving none of theirs to train on; lower "
                    "data.eval_fraction, add data to them, or hold out with data.eval_sources"
                )
        try:
            partition_pairs(
                cfg.sdpo.partition,
                pairs_sources=[p.source for p in pairs],
                pair_indices=[p.index for p in pairs],
                gamma=[0.0] * len(pairs),  # the ranking is not checked here, only the shapes
                steps=cfg.sdpo.steps,
                source_order=[s.name for s in cfg.data.sources],
                seed=cfg.train.seed,
            )
        except ValueError as e:
            raise RunInputError(f"sdpo.partition = {cfg.sdpo.partition!r}: {e}") from None

    def save_input_caches(self) -> None:
        """Write the token caches ``load_inputs`` left pending (rank 0)."""
        saves, self.pending_cache_saves = self.pending_cache_saves, []
        for save in saves:
            save()

    def check_output_dir(self) -> None:
        """Refuse to mix two runs' outputs (before anything is read or written)."""
        if self.overwrite and self.resume:
            raise OutputDirError(
                "--resume and --overwrite exclude each other: --resume continues the run in "
                f"{self.out}, --overwrite replaces it"
            )
        missing = missing_tracker_packages(self.cfg.log.report_to)
        if missing:
            raise RunInputError(
                f"log.report_to names trackers that are not installed: {', '.join(missing)}; "
                "install them or remove them from log.report_to"
            )
        check_writable_folder(self.out)
        if self.cfg.sdpo.cache_dir:  # written after the initial scoring pass: checked now
            check_writable_folder(self.cache_dir, "sdpo.cache_dir")
        old = sorted(p.name for p in existing_outputs(self.out))
        if old and not (self.overwrite or self.resume):
            raise OutputDirError(
                f"output folder {self.out} already holds a run's outputs ({', '.join(old[:6])}); "
                "pass --resume to continue that run, --overwrite to replace it, or choose "
                "another output_dir"
            )

    def _check_inputs_outside_old_outputs(self) -> None:
        """Refuse ``--overwrite`` when an input lives in what it would remove (the model a
        new run starts from being the old run's ``step-<t>/``, say): the old outputs are
        cleared before the model loads, so the input would be deleted and the run fail."""
        cfg = self.cfg
        inputs = [(f"model.path = {str(cfg.model.path)!r}", self.model_dir)]
        if self.reference_dir is not None:
            inputs.append((f"sdpo.reference = {str(cfg.sdpo.reference)!r}", self.reference_dir))
        for what, sources in (("data", cfg.data.sources), ("held-out data", cfg.data.eval_sources)):
            inputs += [(f"the {what} {source.path!r}", Path(source.path)) for source in sources]
        old = [p.resolve() for p in existing_outputs(self.out)]
        for named, path in inputs:
            if not path.exists():  # a hub model or data set name
                continue
            path = path.resolve()
            inside = next((p for p in old if path.is_relative_to(p)), None)
            if inside is not None:
                where = "is" if path == inside else f"is inside {inside},"
                raise RunInputError(
                    f"{named} {where} one of the old run's outputs in {self.out}, which "
                    "--overwrite would delete; copy it out of that folder first (and point the "
                    "config there), or choose another output_dir"
                )

    def _refuse_a_changed_config(
        self, progress: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """Refuse a resume whose config differs from the run's in a key that changes the
        result. ``progress``: a checkpoint's; None reads the newest checkpoint's, as found
        before the data is read (a changed data or tokenizer key would otherwise have the
        whole data set tokenized again before the refusal); every complete checkpoint of the
        run holds the same such keys, and one that cannot be read is left to the full look
        for the resume point after the data. Returns the run's config and this one, as
        compared (None when no checkpoint was read)."""
        if progress is None:
            for _, path in list_checkpoints(self.out / CHECKPOINTS_DIR):
                try:
                    progress = json.loads((path / PROGRESS_NAME).read_text(encoding="utf-8"))
                    progress["config"]
                except (OSError, ValueError, TypeError, KeyError):
                    continue
                break
            else:
                return None
        if isinstance(progress.get("token_cache"), str):
            self.resumed_token_cache = Path(progress["token_cache"]).name
        now = config_to_dict(self.cfg)
        # the precision the run trains in (train.precision resolved when it started; absent
        # in checkpoints of older runs): "auto" keeps it, an explicit value is compared with it
        recorded = progress.get("precision")
        saved = _with_precision(progress["config"], recorded)
        if recorded is not None and self.cfg.train.precision == "auto":
            now = _with_precision(now, recorded)
        changed = changed_config_keys(saved, now)
        if changed:
            why = ""
            if recorded is not None and any(k.startswith("train.precision ") for k in changed):
                why = (
                    f" (train.precision: the run trains in {recorded}, which "
                    'train.precision = "auto" or its own value keeps)'
                )
            raise OutputDirError(
                f"cannot resume the run in {self.out}: the config differs in keys that change "
                f"the result: {'; '.join(changed)}{why}. Resume with the run's config "
                f"({self.out / 'config.toml'}), or start a new run (another output_dir, or "
                "--overwrite)"
            )
        return saved, now

    def find_resume_point(self) -> ResumePoint | None:
        """The newest complete checkpoint, after checking that the config still matches it."""
        path = find_resume_checkpoint(self.out / CHECKPOINTS_DIR, log=_log)
        if path is None:
            if existing_outputs(self.out):
                _log("no complete checkpoint: starting from the beginning (caches are reused)")
            return None
        progress = json.loads((path / PROGRESS_NAME).read_text(encoding="utf-8"))
        saved, now = self._refuse_a_changed_config(progress)
        recorded = progress.get("precision")
        self.precision, note = resumed_precision(self.cfg.train.precision, recorded, self.device)
        if note is not None:
            _log(note)
        # (an older checkpoint resolves the precision here, as a new run does: not refused)
        problem = None if recorded is None else precision_problem(self.precision, self.device)
        if problem is not None:
            raise OutputDirError(
                f"cannot resume the run in {self.out} here: it trains in {self.precision} "
                f'(train.precision = "{self.cfg.train.precision}", as {path.name} records), and '
                f"{problem}. Resume it on a machine that runs {self.precision}, or start a new "
                'run with train.precision = "fp32" (another output_dir, or --overwrite)'
            )
        self._check_attention_backend()  # against the run's precision, not this device's auto
        loose = changed_config_keys(saved, now, rounding=True)
        if loose:
            beyond = beyond_rounding(
                saved,
                now,
                [k.split(" (", 1)[0] for k in loose],
                router_loss=self.router_loss,
                held_out=bool(self.eval_pairs),
            )
            how = (
                "the result equals the uninterrupted run's up to float rounding, not bit for bit"
                if not beyond
                else "the result differs from the uninterrupted run's beyond float rounding "
                f"here: {'; '.join(beyond)}"
            )
            _log(
                f"resuming with changed compute settings: {'; '.join(loose)}. They change how "
                f"the work is batched or computed, not what is trained on: {how}"
            )
        saved_data = progress.get("data_fingerprint")
        if saved_data is None:
            # written before checkpoints kept it: the token ids the run trained on are unknown,
            # and sdpo's tokenization has changed since (a resume trained on other ids, with
            # its partition cut again from values of those)
            raise OutputDirError(
                f"cannot resume the run in {self.out}: {path.name} was written by an sdpo from "
                "before checkpoints recorded the training pairs' token ids and the weights the "
                "run started from, and sdpo has tokenized some text otherwise since, so the "
                "steps still to run could train on other token ids than the run's first steps "
                "without a word. Finish the run with the sdpo that started it, or start a new "
                "run (another output_dir, or --overwrite)"
            )
        if saved_data != self.data_fp:
            why, fix = self._why_other_ids()
            raise OutputDirError(
                f"cannot resume the run in {self.out}: the training pairs' token ids differ from "
                f"those {path.name} was trained on ({why}), so the resumed steps would train on "
                f"other pairs. {fix}, or start a new run (another output_dir, or --overwrite)"
            )
        step = progress["sdpo_step"]
        where = "after" if progress["step_finished"] else "inside"
        _log(f"resuming from {path.name} ({where} sDPO step {step})")
        if progress["step_finished"] and step == self.cfg.sdpo.steps:
            _log(
                f"the run in {self.out} is complete (its last sDPO step, {step}, is done): nothing "
                "left to train; its report is written again"
            )
        return ResumePoint(path=path, progress=progress)

    def _why_other_ids(self) -> tuple[str, str]:
        """Why a resume's token ids differ from the run's, as the training data's token cache
        tells it where it was not reused (what changed since it was written), and what to do."""
        changes = self.token_cache_changes
        if not changes:
            return (
                "a data file, the tokenizer files or sdpo's tokenization changed since the run "
                "started",
                "Restore the inputs the run started with (where sdpo's tokenization changed: "
                "resume with the sdpo that started the run)",
            )
        since = (
            self.cache_dir / self.resumed_token_cache
            if self.resumed_token_cache
            else token_cache_path(self.cache_dir, "train")
        )
        why = f"since {since} was written: {'; '.join(changes)}"
        code = "the tokenizing code changed" in changes
        inputs = [c for c in changes if c != "the tokenizing code changed"]
        if code:  # a tokenizer read otherwise follows from the code alone
            inputs = [c for c in inputs if not c.startswith("the tokenizer as sdpo reads it")]
        if code and not inputs:
            fix = (
                "The inputs are the same, and this sdpo tokenizes them otherwise: resume with "
                "the sdpo that started the run"
            )
        elif code:
            fix = "Restore the inputs the run started with and resume with its sdpo"
        else:
            fix = "Restore the inputs the run started with"
        return why, fix

    def _open_trackers(self, point: ResumePoint | None) -> Trackers:
        try:
            return open_trackers(
                self.cfg.log.report_to,
                output_dir=self.out,
                project=self.cfg.log.project,
                run_name=self.cfg.log.run_name,
                tensorboard_dir=self.cfg.log.tensorboard_dir,
                resume_step=point.progress["run_step"] if point is not None else None,
                config=config_to_dict(self.cfg),
            )
        except TrackerStartError as e:
            raise RunInputError(str(e)) from e

    def prepare_output_dir(
        self, point: ResumePoint | None = None, *, keep: tuple[str, ...] = ()
    ) -> None:
        """Fresh run: with ``overwrite``, clear the old run's outputs (reference caches stay:
        they are keyed, so a matching one is reused safely; and the names in ``keep``, the
        trackers' files of this run). Resume: cut ``metrics.jsonl`` back to what it held at the
        checkpoint, so no step is logged twice."""
        if self.resume:
            metrics = self.out / "metrics.jsonl"
            keep = point.progress["metrics_bytes"] if point is not None else 0
            if metrics.is_file():
                data = metrics.read_bytes()
                if len(data) < keep:
                    _log(f"metrics.jsonl is shorter than at {point.path.name}: kept as it is")
                elif keep == 0:
                    metrics.unlink()
                elif len(data) > keep:
                    atomic_write_bytes(metrics, data[:keep])
        else:
            for p in existing_outputs(self.out):
                if p.name in keep:
                    continue
                if p.is_dir():
                    shutil.rmtree(p)
                else:
                    p.unlink()
        self.out.mkdir(parents=True, exist_ok=True)

    # -- checkpoints ---------------------------------------------------------------------
    def _checkpoint(
        self, capture: Callable[[], tuple[Callable[[], Any], Callable | None]]
    ) -> float:
        """Save one training checkpoint; every rank calls this at the same point, after the
        collectives that gathered onto rank 0 what it writes (data parallel: the others wait
        for rank 0's snapshot, not for its write, and raise its errors).

        On rank 0 ``capture()`` takes what the checkpoint holds (through ``_snapshot``) and
        returns ``(write, done)``: ``write()`` reads only that and writes the files, and
        ``done(result)`` updates the training thread's state. Synchronous: both run here.
        ``train.async_save``: first the previous background write is waited for (one in
        flight; its error is raised here), then ``write`` goes to the writer thread and
        ``done`` runs at the next wait. Returns the seconds the training thread was blocked."""

        def here() -> float:
            start = time.perf_counter()
            if self.writer is None:
                write, done = capture()
                result = write()
                if done is not None:
                    done(result)
            else:
                self.writer.wait()
                write, done = capture()
                self.host_copies.ready()
                self.writer.submit(write, done=done)
            return time.perf_counter() - start

        return on_main(here)

    def _snapshot(self, obj: Any, key: str) -> Any:
        """``obj`` as a write may read it later: with ``train.async_save`` a host copy (the
        buffers of ``key`` reused from save to save), synchronous: ``obj`` itself."""
        return obj if self.writer is None else self.host_copies.copy(obj, key=key)

    def _weights_to_write(
        self, model: torch.nn.Module, gathered: dict[str, torch.Tensor] | None
    ) -> dict[str, torch.Tensor]:
        """The weights a checkpoint write reads: a sharded model's ``gathered`` state dict as it
        is (a fresh copy in host memory already, which training does not change: a host copy
        of it would hold the model twice), else the model's own through ``_snapshot``."""
        if gathered is not None:
            return gathered
        return self._snapshot(model_state_dict(model), "weights")

    def _finish_writes(self, *, collective: bool) -> None:
        """Wait for rank 0's background write and raise its error (``CheckpointWriteError``).
        ``collective``: every rank calls this at the same point and raises that error; else
        rank 0 alone waits (on a path out of the run other ranks may not share)."""
        if collective:
            on_main(self._wait_for_write)
        else:
            self._wait_for_write()

    def _wait_for_write(self) -> None:
        if self.writer is not None:
            self.writer.wait()

    def _save_note(self, blocked_s: float) -> str:
        """The log's note on a save: the time the training thread was blocked by it."""
        if self.cfg.train.async_save:
            return f"saving in the background (training blocked {blocked_s:.2f} s)"
        return f"saved (training blocked {blocked_s:.2f} s)"

    def _progress(self, run_step: int, progress: dict[str, Any]) -> dict[str, Any]:
        """A checkpoint's progress.json as of now: ``metrics_bytes`` is metrics.jsonl's size at
        the save point (a background write may finish after more lines were logged)."""
        metrics = self.out / "metrics.jsonl"
        state = copy.deepcopy(
            {
                **progress,
                "format": 1,
                "run_step": run_step,
                "metrics_bytes": metrics.stat().st_size if metrics.is_file() else 0,
                "config": config_to_dict(self.cfg),
                # train.precision as resolved when the run started: a resume keeps it
                "precision": self.precision,
                "data_fingerprint": self.data_fp,
                # the training data's token cache file (its key's digest in a shared folder):
                # what changed since it was written names the cause of other ids on resume
                "token_cache": self.token_cache_file[0].name if self.token_cache_file else None,
                # the weights the run started from (M0, and sdpo.reference): checked on resume
                "model_fingerprints": dict(self.model_fps),
                "model_architectures": dict(self.model_archs),
            }
        )
        # the pair indices of each sDPO step's chunk, which a resume trains
        # (_trained_partition): set once before the first step and never changed, so shared,
        # not copied (a pair's index each)
        state["chunks"] = self.chunks
        return state

    def _trained_partition(
        self, point: ResumePoint | None, chunks: list[list[int]]
    ) -> list[list[int]]:
        """The chunks to train: on resume, those the checkpoint holds. A partition by the
        initial model's values (easy_to_hard, easy_to_hard_pairs) cut again on resume from
        values scored anew (the initial reference cache gone, and scored on another GPU, world
        size or batch size) can differ from the run's in float rounding, enough to move a pair
        across a cut between near-equal values; the steps still to run would then train some
        pairs twice and others never. Config, data and initial weights are the run's (checked
        before), so the run's partition is the one to keep."""
        saved = point.progress.get("chunks") if point is not None else None
        if saved is None:  # a fresh run, or a checkpoint written before chunks were kept
            return chunks
        if saved != chunks:
            # the order within a chunk counts too: it is the step's data order before shuffling
            moved = sum(len(set(a) - set(b)) for a, b in zip(saved, chunks, strict=True))
            how = (
                f"cut {moved} pair(s) into other chunks than"
                if moved
                else "ordered a chunk's pairs otherwise than"
            )
            _log(
                f"the initial model's values scored anew {how} {point.path.name} trained with "
                "(float rounding of another machine, world size or batch size): keeping the "
                "partition the run trained with"
            )
        return saved

    def _check_same_weights(
        self,
        point: ResumePoint | None,
        role: str,
        fingerprint: str,
        key: str,
        model: torch.nn.Module,
    ) -> str:
        """Record ``fingerprint`` as the ``role`` weights' (checkpoints keep it), and on resume
        refuse initial (or reference) weights other than those the run started from. A config
        names the folder or hub id, not the weights in it; other weights would give another
        partition and other reference values for the steps still to run. Returns the
        fingerprint that keys the weights' reference caches: the run's own where an earlier
        release fingerprinted the same weights otherwise (``earlier_model_fingerprints``)."""
        self.model_fps[role] = fingerprint
        self.model_archs[role] = architecture_text(model)
        if point is None:
            return fingerprint
        saved = (point.progress.get("model_fingerprints") or {}).get(role)
        if saved is None or saved == fingerprint:
            return fingerprint
        value = self.cfg.model.path if role == "initial" else self.cfg.sdpo.reference
        earlier = self._earlier_fingerprints(model, fingerprint)
        if saved in earlier:
            _log(
                f"{key} ({value}): the run recorded these weights under the fingerprint an "
                f"earlier release computed ({saved[:12]}; now {fingerprint[:12]}), which described "
                "the model's configuration otherwise (a sliding window, the keys of a "
                "transformers config); the weights are the same: resuming"
            )
            self.model_fps[role] = saved
            self._earlier_fps[saved] = earlier  # the weights the caches now key by it
            texts = earlier_architecture_texts(model)
            self.model_archs[role] = (point.progress.get("model_architectures") or {}).get(
                role, texts[earlier.index(saved)] if len(texts) == len(earlier) else ""
            )
            return saved
        fingerprints = f"{fingerprint[:12]}, the run's {saved[:12]}"
        raise OutputDirError(
            f"cannot resume the run in {self.out}: {key} ({value}) "
            f"{self._what_differs(point, role, model, fingerprints)}, so the steps still to "
            "run would follow another partition and other reference values. Restore "
            f"{self._what_to_restore(point, role, model)}, or start a new run (another "
            "output_dir, or --overwrite)"
        )

    def _what_differs(
        self, point: ResumePoint, role: str, model: torch.nn.Module, fingerprints: str
    ) -> str:
        """What of the ``role`` model differs from the run's start, for the refusal: its
        weights, its configuration (naming the fields), or, for a run whose checkpoint records
        only the fingerprint of both (an earlier release's), either; ``fingerprints`` (now and
        the run's) in parentheses. Hashes the weights once more (a collective for a sharded
        model)."""
        arch = (point.progress.get("model_architectures") or {}).get(role)
        if not isinstance(arch, str):
            return (
                "holds other weights than when the run started, or the same weights with "
                "another configuration of the model (the run's checkpoint keeps one fingerprint "
                f"of both: {fingerprints})"
            )
        now = self._arch_as_recorded(role, model, arch)
        fields = architecture_differences(arch, now)
        config = (
            f"the model's configuration differs in {'; '.join(fields)}"
            if fields
            else "the model's configuration reads otherwise"
        )
        saved = point.progress["model_fingerprints"][role]
        if self._fingerprint_with(model, arch) == saved:
            return (
                f"holds the weights the run started from, but {config} (fingerprint {fingerprints})"
            )
        if arch == now:
            return f"holds other weights than when the run started (fingerprint {fingerprints})"
        return (
            f"holds other weights than when the run started, and {config} (fingerprint "
            f"{fingerprints})"
        )

    def _arch_as_recorded(self, role: str, model: torch.nn.Module, arch: str) -> str:
        """The ``role`` model's architecture text now, in the recipe of ``arch`` (the text a
        checkpoint recorded): a run an earlier recipe fingerprinted records that recipe's text
        (``earlier_architecture_texts``), which this one may describe otherwise with no field
        changed; of this text and the earlier recipes', the one closest to ``arch``."""
        now = self.model_archs[role]
        texts = [now, *earlier_architecture_texts(model)]
        return min(texts, key=lambda text: len(architecture_differences(arch, text)))

    def _what_to_restore(self, point: ResumePoint, role: str, model: torch.nn.Module) -> str:
        """The refusal's advice: the weights, or the configuration where only it differs."""
        arch = (point.progress.get("model_architectures") or {}).get(role)
        if not isinstance(arch, str):
            return (
                "those weights and that configuration (a hub model: pin its commit with the "
                "revision key; a transformers or sdpo that reads the config otherwise: the "
                "version the run started with)"
            )
        if arch != self._arch_as_recorded(role, model, arch):
            return (
                "the model as it was (its config.json; a hub model: pin its commit with the "
                "revision key; a transformers or sdpo that reads the config otherwise: the "
                "version the run started with)"
            )
        return "those weights (a hub model: pin its commit with the revision key)"

    def _write_checkpoint_here(
        self,
        run_step: int,
        *,
        progress: dict[str, Any],
        extra: Callable[[Path], None],
        external: dict,
    ) -> Path:
        """Write one training checkpoint (rank 0; the training or the writer thread):
        ``extra(tmp)`` writes the weights/trainer state, then progress.json, the manifest last,
        the rename, and only then the pruning of old checkpoints."""
        root = self.out / CHECKPOINTS_DIR
        path = root / checkpoint_name(run_step)

        def contents(tmp: Path) -> None:
            extra(tmp)
            atomic_write_json(tmp / PROGRESS_NAME, progress)

        try:
            write_checkpoint(path, write_contents=contents, external=external)
        except OSError as e:
            older = [p.name for _, p in list_checkpoints(root)]
            raise CheckpointWriteError(
                f"writing checkpoint {path} failed ({e.strerror or e}); "
                f"{'the previous checkpoint ' + older[0] if older else 'no earlier checkpoint'} "
                "is intact. Free disk space (or fix the folder's permissions), then continue "
                "with --resume"
            ) from e
        fault_point("ckpt_done")
        prune_checkpoints(root, keep=self.cfg.train.keep_checkpoints)
        return path

    def _checkpoint_written(self, path: Path) -> None:
        self.last_checkpoint = path

    def _save_mid_step(self, trainer: DPOTrainer, *, base: dict[str, Any]) -> None:
        """Trainer callback: a checkpoint inside an sDPO step (weights + trainer state). With
        LoRA the weights are the adapter's only: the frozen base is M_{t-1}, on disk already
        (``step-<t-1>/``, checksummed as the checkpoint's external files, or ``model.path``,
        checked against the fingerprint in ``lora_base`` on resume)."""
        lora = self.cfg.lora.enabled
        model = trainer.model
        # sharded: a collective, before rank 0 writes
        weights = None if lora else self._gathered(model)
        state = trainer.state_dict()  # sharded: the optimizer gathered onto rank 0 (a collective)
        run_step = base["run_step_base"] + trainer.position["step_in_run"]

        def capture() -> tuple[Callable[[], Path], Callable[[Path], None]]:
            adapter = full = config = None
            tokenizer = []
            if lora:
                adapter = self._snapshot(lora_state_dict(model), "adapter")
            else:
                full = self._weights_to_write(model, weights)
                config = pretrained_config(model, precision=self.precision)
                # a model folder sdpo score, AutoTokenizer and AutoProcessor read as they read
                # step-<t>/
                tokenizer = processing_files(self.model_dir)
            saved_state = self._snapshot(state, "trainer")
            # M_{t-1}'s files: written before (the previous write was waited for first)
            external = copy.deepcopy(self.weights_files)
            progress = self._progress(
                run_step, {**base, "step_finished": False, "weights_files": external}
            )

            def extra(tmp: Path) -> None:
                if adapter is not None:
                    atomic_write_bytes(tmp / ADAPTER_STATE_NAME, safetensors_bytes(adapter))
                else:
                    save_pretrained(
                        None, tmp / "model", state=full, config=config, extra_files=tokenizer
                    )
                with atomic_open(tmp / TRAINER_STATE_NAME, "wb") as f:
                    torch.save(saved_state, f)

            write = partial(
                self._write_checkpoint_here,
                run_step,
                progress=progress,
                extra=extra,
                external=external,
            )
            return write, self._checkpoint_written

        blocked = self._checkpoint(capture)
        _log(f"checkpoint {checkpoint_name(run_step)} {self._save_note(blocked)}")

    def _save_step_end(
        self,
        model: torch.nn.Module,
        *,
        t: int,
        run_step: int,
        weights: dict[str, torch.Tensor] | None,
        adapter: dict[str, torch.Tensor] | None,
        kept_optimizer: dict[str, Any] | None,
        progress: dict[str, Any],
    ) -> float:
        """The end of sDPO step t: ``step-<t>/`` (M_t, with LoRA also the step's adapter in
        PEFT's layout), then the end-of-step checkpoint that checksums it as external files
        (and holds the optimizer when it is kept across steps), as one write. ``weights``: a
        sharded model's gathered state dict (None: the model's own). Returns the seconds the
        training thread was blocked.

        Nothing reads ``step-<t>/`` while this write may be in flight: the next step's
        reference values come from the policy in memory, the LoRA adapter's ``base_model`` is
        only a path written into adapter_config.json, and the next checkpoint's external
        entries (``self.weights_files``) are set by ``done`` when the next save (or the run's
        end) has waited for this write. A resume reads it only through a checkpoint whose
        manifest was written after it."""
        step_dir = self.out / f"step-{t}"
        model_dir = self.model_dir

        def capture() -> tuple[Callable[[], dict], Callable[[dict], None]]:
            full = self._weights_to_write(model, weights)
            config = pretrained_config(model, precision=self.precision)
            write_adapter = None
            if adapter is not None:
                # the base M_{t-1}: model.path, by hub id and commit where it is a hub model
                # (its snapshot's path names it in this machine's hub cache only), then step-<t-1>/
                hub = hub_snapshot(self.cfg.model.path, model_dir) if t == 1 else None
                base_model, revision = hub or (
                    str(model_dir if t == 1 else self.out / f"step-{t - 1}"),
                    None,
                )
                write_adapter = partial(
                    self._write_peft_adapter,
                    self._snapshot(adapter, "peft"),
                    base_model=base_model,
                    revision=revision,
                )
            kept = None
            if kept_optimizer is not None:
                kept = self._snapshot({"optimizer": kept_optimizer}, "trainer")
            saved = self._progress(run_step, progress)
            extra_files = processing_files(model_dir)

            def extra(tmp: Path) -> None:
                if kept is not None:
                    with atomic_open(tmp / TRAINER_STATE_NAME, "wb") as f:
                        torch.save(kept, f)

            def write() -> dict:
                save_pretrained(
                    None,
                    step_dir,
                    extra_files=extra_files,
                    state=full,
                    config=config,
                    write_extra=write_adapter,
                )
                fault_point("step_saved")
                files = [p for p in step_dir.iterdir() if p.is_file()]
                step_files = file_entries(files, base=self.out)
                path = self._write_checkpoint_here(
                    run_step,
                    progress={**saved, "weights_files": step_files},
                    extra=extra,
                    external=step_files,
                )
                return {"weights_files": step_files, "checkpoint": path}

            return write, self._step_written

        return self._checkpoint(capture)

    def _step_written(self, result: dict) -> None:
        self.weights_files = result["weights_files"]  # M_t: external files of the next ones
        self.last_checkpoint = result["checkpoint"]

    # -- the run -------------------------------------------------------------------------
    def run(self) -> RunResult:
        """The whole run; a Ctrl-C that ends it at once is a ``RunInterrupted``."""
        try:
            return self._run_all()
        except RunInterrupted:
            raise
        except KeyboardInterrupt:
            newest = list_checkpoints(self.out / CHECKPOINTS_DIR) if self.wrote_outputs else []
            raise RunInterrupted(
                wrote=self.wrote_outputs, checkpoint=newest[0][1].name if newest else None
            ) from None

    def _run_all(self) -> RunResult:
        self.check_output_dir()  # every rank checks: the same error everywhere, nothing written
        if self.resume:  # a changed config is refused before the data is read and tokenized
            on_main(self._refuse_a_changed_config)
        tokenizer, pairs = self.load_inputs()
        if self.overwrite:
            self._check_inputs_outside_old_outputs()
        # the token ids the run trains on: kept in every checkpoint, checked on resume
        self.data_fp = data_fingerprint(pairs)
        self._data_fp_of = pairs

        def prepare() -> ResumePoint | None:
            point = self.find_resume_point() if self.resume else None
            # a refused resume has written nothing, the token caches included; so has a tracker
            # that cannot start: they start before an old run's outputs are cleared
            if self.cfg.log.report_to:
                self.trackers = self._open_trackers(point)
            try:
                with _interrupt_deferred():  # an old run's outputs are cleared whole or not at all
                    self.wrote_outputs = True
                    # a fresh W&B run's id was just written to tracking.json
                    wandb = "wandb" in self.cfg.log.report_to
                    self.prepare_output_dir(point, keep=(TRACKING_STATE,) if wandb else ())
                    self.save_input_caches()
                    write_resolved_config(self.cfg, self.out / "config.toml")
            except BaseException:
                self.trackers.close()
                raise
            return point

        point = on_main(prepare)  # data parallel: rank 0 writes, every rank gets the point
        if point is not None:  # every rank trains in the precision rank 0 resumed with
            self.precision, _ = resumed_precision(
                self.cfg.train.precision, point.progress.get("precision"), self.device
            )
        emulated = emulated_bf16_warning(self.precision, self.device)
        if emulated is not None:
            _log(f"warning: {emulated}")
        if distributed.active():  # a torchrun launch says how it runs, as one process cannot
            how = (
                "the model sharded over them (train.fsdp)"
                if self.cfg.train.fsdp
                else "each holds the whole model"
            )
            _log(
                f"data parallel over {distributed.world()} ranks ({distributed.backend()}, "
                f"{self.device.type}): {how}"
            )
        if self.cfg.train.fsdp and not distributed.active():
            _log(
                "train.fsdp = true shards the model over the ranks of torchrun; this is one "
                "process, so the model is whole (start with torchrun --nproc-per-node N to shard)"
            )
        if self.cfg.train.async_save and distributed.is_main():
            self.writer = BackgroundWriter()
        if self._records_memory_history:
            start_memory_history()
        elif self.cfg.profile.memory_on_oom:
            _log(
                "profile.memory_on_oom records the CUDA allocator: nothing to record on "
                f"{self.device.type}"
            )
        with self._stop_signals():
            try:
                try:
                    return self._run(pairs, point)
                except (TrainingStopped, NonFiniteError):
                    # every rank stops at the same point: rank 0's pending write is waited for
                    # in a collective, so its error (exit code 74) is every rank's
                    self._finish_writes(collective=True)
                    raise
                except BaseException:
                    self._finish_writes(collective=False)  # its error, if any, wins
                    raise
            except TrainingStopped as e:
                newest = list_checkpoints(self.out / CHECKPOINTS_DIR)
                e.checkpoint = newest[0][1] if newest else None
                raise
            except NonFiniteError as e:
                where = ", ".join(
                    f"{i}: {self._rows_of_pairs.get(i, '?')}" for i in e.pair_indices[:8]
                )
                raise NonFiniteError(
                    f"{e}. Data rows of these pairs: {where}", pair_indices=e.pair_indices
                ) from None
            except torch.OutOfMemoryError as e:
                raise OutOfMemoryStop(
                    self._out_of_memory_message() + self._out_of_memory_snapshot(),
                    settings_may_change=self.phase != LOADING,
                ) from e
            finally:
                if self._records_memory_history:
                    stop_memory_history()
                self.trackers.close()
                if self.writer is not None:
                    self.writer.close()
                    self.writer = None

    def _run(self, pairs: list[TokenizedPair], point: ResumePoint | None) -> RunResult:
        cfg = self.cfg
        model_dir = self.model_dir
        by_index = {p.index: p for p in pairs}

        fixed_ref: PairLogps | None = None
        if self.reference_dir is not None:
            fixed_ref = self._score_with_separate_reference(self.reference_dir, pairs, point)

        model = self._load_model(model_dir)
        t0 = time.perf_counter()
        initial_fp = self._check_same_weights(
            point, "initial", self._fingerprint(model), "model.path", model
        )
        self._stop_if_asked(point.progress["run_step"] if point is not None else 0)
        partition_args: dict[str, Any] = {
            "pairs_sources": [p.source for p in pairs],
            "pair_indices": [p.index for p in pairs],
            "source_order": [s.name for s in cfg.data.sources],
            "seed": cfg.train.seed,
        }
        # The initial model's values of every pair serve the easy-to-hard partitions and the
        # report (the partition's numbers, step 1's γ on chunk 2). A random or given partition
        # without report scoring needs them for chunk 1 alone: its reference values.
        # With a separate reference (sdpo.reference) chunk 1's reference values are the
        # reference's too, so the initial model scores nothing there.
        chunks, unscored = None, []
        if self.scores_chunk_one_only:
            chunks = partition_pairs(
                cfg.sdpo.partition, steps=cfg.sdpo.steps, gamma=None, **partition_args
            )
            first = 0 if fixed_ref is not None else 1
            unscored = [i for chunk in chunks[first:] for i in chunk]
            scored = [by_index[i] for chunk in chunks[:first] for i in chunk]
        else:
            scored = pairs
        initial = self.cached_reference("initial", model, initial_fp, scored) if scored else None
        initial_scoring_s = time.perf_counter() - t0
        if self.eval_pairs:  # the yardstick of every step's eval rewards: the initial model
            self.eval_initial = self.cached_reference(
                "eval-initial", model, initial_fp, self.eval_pairs
            )
        gamma = dict.fromkeys(partition_args["pair_indices"], float("nan"))
        if initial is None:
            _log(
                "initial model: no scoring pass (sdpo.report_scoring = false, and every step's "
                "reference values come from sdpo.reference)"
            )
        else:
            _log(
                f"initial model: reward accuracy {float((initial.gamma > 0).float().mean()):.3f}, "
                f"mean γ {float(initial.gamma.mean()):.3f} over {len(scored)} pairs"
                + (" (chunk 1: sdpo.report_scoring = false)" if unscored else "")
            )
            gamma.update(zip(initial.pair_indices.tolist(), initial.gamma.tolist(), strict=True))
        partition_args["gamma"] = list(gamma.values())
        if chunks is None:
            chunks = partition_pairs(cfg.sdpo.partition, steps=cfg.sdpo.steps, **partition_args)
        chunks = self.chunks = self._trained_partition(point, chunks)
        partition = describe_partition(
            cfg.sdpo.partition, chunks, unscored=unscored, **partition_args
        )
        _log("partition:\n" + partition.format())

        # With reset_optimizer = false, one optimizer and one LR schedule span all steps.
        train_cfg = _train_config(cfg, self.precision)
        optimizer = None
        schedule_total, schedule_done = None, 0
        if not cfg.sdpo.reset_optimizer:
            schedule_total = sum(
                len(plan_steps([by_index[i] for i in chunk], train_cfg, epoch=e))
                for chunk in chunks
                for e in range(cfg.train.epochs)
            )

        reports: list[StepReport] = []
        start_step, run_step_base = 1, 0
        tokens_base = 0  # the input tokens trained on in earlier sDPO steps (num_tokens)
        self.weights_files = {}  # the external files of the checkpoints: M_{t-1}'s; {} for M0
        mid_state: dict[str, Any] | None = None
        if point is not None:
            prog = point.progress
            reports = [StepReport.from_dict(d) for d in prog["reports"]]
            start_step = prog["sdpo_step"] + (1 if prog["step_finished"] else 0)
            schedule_done, run_step_base = prog["schedule_done"], prog["run_step_base"]
            tokens_base = prog.get("tokens_base", 0)  # absent before num_tokens was logged
            self.weights_files = prog["weights_files"]
            state = point.trainer_state()
            if not prog["step_finished"]:
                mid_state = state
        for t, chunk in enumerate(chunks, start=1):
            if t < start_step:
                continue
            if point is not None and t == start_step and t > 1:
                model = None
                gc.collect()
                model = self._load_model(self.out / f"step-{t - 1}")  # M_{t-1}
                if state is not None and mid_state is None:  # kept optimizer across steps
                    sharded = sharding.is_sharded(model)
                    optimizer = build_optimizer(model, train_cfg, fused=False if sharded else None)
                    if sharded:  # rank 0's copy broadcast, every rank keeps its shard
                        sharding.load_full_optimizer_state_dict(
                            model, optimizer, state["optimizer"]
                        )
                    else:
                        optimizer.load_state_dict(state["optimizer"])
            # the run's optimizer steps so far (a resumed one's, inside its step, from its point)
            done = point.progress["run_step"] if point is not None and t == start_step else None
            self._stop_if_asked(run_step_base if done is None else done)
            fault_point("step_start")
            chunk_pairs = [by_index[i] for i in chunk]
            t0 = time.perf_counter()
            # the fingerprint of M_{t-1}: keys step t's reference cache and, with LoRA, names the
            # frozen base of the step's checkpoints
            base_fp = initial_fp if t == 1 else None
            if base_fp is None and (fixed_ref is None or cfg.lora.enabled):
                base_fp = self._fingerprint(model)
            if fixed_ref is not None:
                ref = fixed_ref
            elif t == 1:
                ref = initial
            else:  # M_{t-1} is the policy in memory, before its first update of this step
                ref = self.cached_reference(f"step-{t}", model, base_fp, chunk_pairs)
            ref_gamma = ref.gamma[ref.rows_for(torch.tensor(chunk, dtype=torch.int64))]
            next_gamma = self._next_chunk_gamma(t, chunks, by_index, model, ref, initial)
            scoring_s = (initial_scoring_s if t == 1 else 0.0) + time.perf_counter() - t0

            resume_state = None
            if mid_state is not None and t == start_step:
                resume_state = mid_state
                if not cfg.lora.enabled:
                    model = None
                    gc.collect()
                    model = self._load_model(point.path / "model")
            # a stop asked for while a model loaded or the reference pass scored ends here
            self._stop_if_asked(run_step_base if done is None else done)
            if cfg.lora.enabled:  # a fresh adapter on M_{t-1}, after its reference values
                self._attach_adapter(model, t=t, base_fp=base_fp, point=point, resume=resume_state)
            base = {
                "sdpo_step": t,
                "schedule_done": schedule_done,
                "run_step_base": run_step_base,
                "tokens_base": tokens_base,
                "reports": [r.to_dict() for r in reports],
            }
            if cfg.lora.enabled:
                base["lora_base"] = base_fp
            beta, lr = step_settings(cfg, t)
            trainer = DPOTrainer(
                model,
                config=dataclasses.replace(train_cfg, learning_rate=lr),
                loss_fn=partial(dpo_loss, config=dataclasses.replace(cfg.loss, beta=beta)),
                kernels_impl=self.impl,
                chunk_tokens=cfg.kernels.chunk_tokens,
                max_chunk_tokens=cfg.kernels.max_chunk_tokens,
                ld_alpha=cfg.loss.ld_alpha,
                output_dir=self.out,
                metrics_extra={"sdpo_step": t},
                progress=self.progress,
                optimizer=optimizer,
                save_checkpoint=partial(self._save_mid_step, base=base),
                stop_requested=lambda: self.stop_flag,
                evaluate=partial(
                    self._evaluate_in_step, t=t, beta=beta, base=run_step_base, tokens=tokens_base
                ),
                profiler=self._profiler(t),
                token_metrics=cfg.log.token_metrics,
            )
            trainer.run_step_base = run_step_base  # records' run_step counts on across steps
            trainer.num_tokens_base = tokens_base  # and their num_tokens
            if self.trackers:  # x-axis: the run's step
                trainer.log_hook = partial(self._track_step, base=run_step_base)
            trainer.global_step = schedule_done
            _log(f"step {t}/{len(chunks)}: {len(chunk_pairs)} pairs, beta={beta}, lr={lr}")
            self.phase = (
                f"training sDPO step {t}, in micro-batches of up to "
                f"{train_cfg.max_tokens_per_batch} tokens (train.max_tokens_per_batch)"
            )
            self.in_optimizer_steps, self.trainer = True, trainer
            try:
                result = trainer.fit(
                    chunk_pairs,
                    ref,
                    schedule_steps=schedule_total,
                    schedule_offset=schedule_done,
                    resume_state=resume_state,
                )
            except TrainingStopped:  # named by the run's step, as its checkpoint is
                raise TrainingStopped(run_step_base + trainer.position["step_in_run"]) from None
            finally:
                self.in_optimizer_steps, self.trainer = False, None
            self.phase = f"saving sDPO step {t}'s results"
            run_step_base += result.optimizer_steps
            tokens_base += result.tokens
            if not cfg.sdpo.reset_optimizer:
                optimizer, schedule_done = trainer.optimizer, schedule_done + result.optimizer_steps
            del trainer
            adapter = None
            if cfg.lora.enabled:  # M_t = M_{t-1} with the step's adapter merged in
                adapter = lora_state_dict(model)  # also written in PEFT's layout
                self._warn_merge_rounding(model, merge_lora(model), t=t)
            weights = self._gathered(model)  # sharded: a collective, before rank 0 writes
            acc_after = None
            if cfg.sdpo.report_scoring:
                acc_after = float((self.score(model, chunk_pairs).gamma > 0).float().mean())
            eval_metrics = self._evaluate(
                model, t=t, beta=beta, run_step=run_step_base, num_tokens=tokens_base
            )
            reports.append(
                StepReport(
                    step=t,
                    num_pairs=len(chunk_pairs),
                    sources=sorted({p.source for p in chunk_pairs}),
                    beta=beta,
                    learning_rate=lr,
                    train_metrics=result.last_metrics,
                    gamma_ref_chunk=float(ref_gamma.mean()),
                    gamma_ref_next_chunk=next_gamma,
                    reward_accuracy_before=float((ref_gamma > 0).float().mean()),
                    reward_accuracy_after=acc_after,
                    eval_metrics=eval_metrics,
                    train_seconds=result.seconds,
                    scoring_seconds=scoring_s,
                )
            )
            self.trackers.log(
                {
                    f"sdpo/{key}": getattr(reports[-1], key)
                    for key in (
                        "gamma_ref_chunk",
                        "gamma_ref_next_chunk",
                        "reward_accuracy_before",
                        "reward_accuracy_after",
                    )
                    if getattr(reports[-1], key) is not None
                },
                step=run_step_base,
            )
            # the optimizer kept across steps; sharded: gathered onto rank 0 (a collective, so
            # every rank calls it before rank 0 writes), in the plain form
            kept = None
            if optimizer is not None:
                kept = (
                    sharding.full_optimizer_state_dict(model, optimizer)
                    if sharding.is_sharded(model)
                    else optimizer.state_dict()
                )
            self.phase = f"saving sDPO step {t}'s results"  # the scoring passes above set theirs
            blocked = self._save_step_end(
                model,
                t=t,
                run_step=run_step_base,
                weights=weights,
                adapter=adapter,
                kept_optimizer=kept,
                progress={
                    **base,
                    "step_finished": True,
                    "schedule_done": schedule_done,
                    "run_step_base": run_step_base,
                    "tokens_base": tokens_base,
                    "reports": [r.to_dict() for r in reports],
                },
            )
            del weights, kept
            _log(f"step {t} done: {self.out / f'step-{t}'} {self._save_note(blocked)}")

        # the last write finished (its error raised on every rank) before the reports
        self._finish_writes(collective=True)

        def finish() -> None:
            fault_point("reports")
            held_out = self._held_out_report()
            write_reports(reports, self.out, partition=partition, held_out=held_out)
            print(format_summary_table(reports))
            if held_out is not None and "initial_preference_accuracy" in held_out:
                after = [
                    f"after step {r.step} {r.eval_metrics['eval/preference_accuracy']:.3f}"
                    for r in reports
                    if r.eval_metrics and "eval/preference_accuracy" in r.eval_metrics
                ]
                print(
                    f"held-out preference accuracy ({held_out['pairs']} pairs, "
                    f"{held_out['from']}): initial model "
                    f"{held_out['initial_preference_accuracy']:.3f}"
                    + "".join(f", {a}" for a in after)
                )
            if not plot_steps(self.out / "metrics.jsonl", reports, self.out / "sdpo_steps.png"):
                _log(PLOT_HINT)

        on_main(finish)
        # a stop asked for while the last step saved or scored found no optimizer step left:
        # the run ran to its end, and the log's "stopping before the next optimizer step" is
        # corrected here, so that no one resumes a finished run
        if distributed.any_rank(self.stop_flag):
            _log(
                "the stop asked for came after the run's last optimizer step: the run is "
                f"complete, its outputs are in {self.out} (nothing to resume)"
            )
        return RunResult(output_dir=self.out, reports=reports, scoring_calls=self.scoring_calls)

    @property
    def _records_memory_history(self) -> bool:
        return self.cfg.profile.memory_on_oom and self.device.type == "cuda"

    def _out_of_memory_snapshot(self) -> str:
        """``profile.memory_on_oom``: this rank's allocator history up to the failure, written
        to the profile folder; the sentence that says where (empty when not recorded)."""
        if not self._records_memory_history:
            return ""
        path = self.out / PROFILE_DIR / f"oom.rank{distributed.rank()}.memory.pickle"
        try:
            write_memory_snapshot(path)
        except Exception as exc:  # the out-of-memory message matters more than the snapshot
            return f". The allocator's history could not be written to {path}: {exc}"
        finally:
            stop_memory_history()
        return (
            f". The allocator's history up to the failure (every allocation with its stack) is "
            f"in {path}: open it at pytorch.org/memory_viz"
        )

    def _out_of_memory_message(self) -> str:
        cfg = self.cfg
        if self.phase == LOADING:
            return self._out_of_memory_loading_message()
        training = self.phase.startswith("training")
        ways = []
        if training:
            fixed = cfg.train.pairs_per_step is not None or cfg.train.tokens_per_step is not None
            ways.append(
                f"lower train.max_tokens_per_batch (now {cfg.train.max_tokens_per_batch})"
                + (
                    " (the optimizer steps stay the same: gradient accumulation)"
                    if fixed
                    else " with train.pairs_per_step set to the pairs per step you want (without "
                    "it the micro-batch is the optimizer step, and a resume refuses the change)"
                )
            )
            if not cfg.model.gradient_checkpointing and self.implementation == "sdpo":
                ways.append(
                    "recompute activations: model.gradient_checkpointing = true (with "
                    "model.checkpoint_every = 2 for every 2nd layer), or, with model.compile, "
                    "model.activation_memory_budget = 0.5"
                )
            elif not cfg.model.gradient_checkpointing:
                ways.append("recompute activations: model.gradient_checkpointing = true")
            if self.logit_softcap is None:
                ways.append(
                    "cap the log-prob head's logits for long pairs and large vocabularies: "
                    f"kernels.max_chunk_tokens = 2048 (now {cfg.kernels.max_chunk_tokens})"
                )
            else:  # the soft-capped head holds kernels.chunk_tokens rows of logits
                ways.append(
                    "hold fewer rows of the soft-capped head's logits at once: "
                    f"kernels.chunk_tokens = 256 (now {cfg.kernels.chunk_tokens or 'its default'})"
                )
            if not cfg.lora.enabled:
                ways.append(
                    "or, as a new run, train a LoRA adapter instead of every weight "
                    "(lora.rank = 16)"
                )
        else:
            budget = cfg.sdpo.score_tokens_per_batch or 4 * cfg.train.max_tokens_per_batch
            ways.append(f"lower sdpo.score_tokens_per_batch (now {budget})")
        kept = self._newest_checkpoint_note()
        return (
            f"the GPU ran out of memory while {self.phase}. Ways out: "
            + "; ".join(ways)
            + f". {kept}; the compute and batch-size settings above may change on --resume (the "
            "result then equals the uninterrupted run's up to float rounding)"
        )

    def _newest_checkpoint_note(self) -> str:
        newest = list_checkpoints(self.out / CHECKPOINTS_DIR)
        if newest:
            return f"the newest training checkpoint, {newest[0][1].name}, is intact"
        return "no training checkpoint was written yet"

    def _out_of_memory_loading_message(self) -> str:
        """The weights alone did not fit: the batch sizes do not matter yet. What bounds them
        is the parameter dtype, the sharding and what else holds the GPU's memory."""
        cfg = self.cfg
        ways = ["free the memory other processes hold on this GPU (nvidia-smi lists them)"]
        if cfg.train.fsdp and not sharding.wanted(cfg.train.fsdp):
            ways.append(
                "run under torchrun on several GPUs, where the train.fsdp = true set here shards "
                "the weights (a resume may change the number of GPUs)"
            )
        elif sharding.wanted(cfg.train.fsdp):
            ways.append("shard the weights over more GPUs (torchrun --nproc_per_node)")
        new_run: list[str] = []
        if parameter_dtype(self.precision) != torch.bfloat16:
            now = f'"{cfg.train.precision}"'
            if cfg.train.precision != self.precision:
                now += f", here {self.precision}"
            new_run.append(
                f'train.precision = "bf16" (now {now}) for weights of 2 bytes a parameter '
                "instead of 4 (bf16 weights round away most updates at learning rates near 5e-7)"
            )
        if not cfg.train.fsdp:
            new_run.append("train.fsdp = true under torchrun to shard them over several GPUs")
        new_run.append("a smaller model")
        ways.append(
            "as a new run (a resume keeps the dtype and the sharding setting): "
            + ", ".join(new_run[:-1])
            + (", or " if len(new_run) > 1 else "")
            + new_run[-1]
        )
        kept = self._newest_checkpoint_note()
        return (
            f"the GPU ran out of memory while {self.phase}, with no batch in memory yet (the "
            "batch sizes do not matter here). Ways out: " + "; ".join(ways) + f". {kept}"
        )

    def _track_step(self, record: dict, *, base: int) -> None:
        """A training record to the trackers, at its run step, with its optimizer step within
        the sDPO step (``base``: the run steps before it) as ``step_in_sdpo_step``
        (``record["step"]`` restarts with each sDPO step only when the optimizer is reset)."""
        values = {k: v for k, v in record.items() if k != "run_step"}
        at = record["run_step"]
        self.trackers.log({**values, "step_in_sdpo_step": at - base}, step=at)

    def _evaluate_in_step(
        self, trainer: DPOTrainer, *, t: int, beta: float, base: int, tokens: int
    ) -> None:
        """Trainer callback (``train.eval_every``): the eval pass inside sDPO step t; training
        is the run's phase again once it returns (its scoring pass set its own, which an
        out-of-memory error raised inside it keeps)."""
        training = self.phase
        run_step = base + trainer.position["step_in_run"]
        self.evaluating_after = run_step  # a stop asked for now says what follows the pass
        try:
            self._evaluate(
                trainer.model,
                t=t,
                beta=beta,
                run_step=run_step,
                num_tokens=tokens + trainer.position["tokens"],
            )
        finally:
            self.evaluating_after = None
        self.phase = training

    def _held_out_report(self) -> dict[str, Any] | None:
        """The report's ``held_out`` section: how many pairs, from where (the rows
        ``data.eval_fraction`` drew; for ``data.eval_sources`` how many are also training
        pairs) and the initial model's preference accuracy and mean γ on them, the baseline of
        every step's ``eval/preference_accuracy`` and ``eval/gamma``."""
        if not self.eval_pairs:
            return None
        d = self.cfg.data
        sources: dict[str, int] = {}
        for pair in self.eval_pairs:
            sources[pair.source] = sources.get(pair.source, 0) + 1
        out: dict[str, Any] = {"pairs": len(self.eval_pairs), "sources": sources}
        if d.eval_sources:
            out["from"] = "data.eval_sources"
            out["also_training_pairs"] = self.held_out_overlap
        else:
            out["from"] = "data.eval_fraction"
            out["eval_fraction"] = d.eval_fraction
            out["seed"] = self.cfg.train.seed
            out["rows"] = list(self.held_out_rows)
        if self.eval_initial is not None:
            gamma = self.eval_initial.chosen_logps - self.eval_initial.rejected_logps
            out["initial_preference_accuracy"] = float((gamma > 0).float().mean())
            out["initial_gamma"] = float(gamma.double().mean())
        return out

    def _evaluate(
        self, model: torch.nn.Module, *, t: int, beta: float, run_step: int, num_tokens: int
    ) -> dict[str, float] | None:
        """Score the held-out pairs with the model after step t (or inside it, at run step
        ``run_step``, with train.eval_every); DPO metrics against the initial model (one fixed
        yardstick for every step), logged to metrics.jsonl as eval/*; ``num_tokens``: the
        input tokens trained on so far (eval/num_tokens, as TRL logs it)."""
        if not self.eval_pairs or self.eval_initial is None:
            return None
        # as in training: WPO weights each held-out pair by the policy's sums from the same pass
        # (TRL's evaluate() weights its loss), and with LD-DPO the sft / rpo_alpha terms read
        # the raw sums; a mixture of experts adds its router loss times the coefficient it
        # trains with, as TRL's evaluate() adds it to eval_loss
        coef = float(getattr(model, "router_aux_loss_coef", 0.0) or 0.0)
        scores = self.score(
            model,
            self.eval_pairs,
            aligned=self.cfg.loss.use_weighting,
            raw=self.cfg.loss.needs_raw_logps,
            stats=self.cfg.log.token_metrics,
            router_loss=bool(coef),
        )
        ref = self.eval_initial
        rows = ref.rows_for(scores.pair_indices)
        out = dpo_loss(
            scores.chosen_logps,
            scores.rejected_logps,
            ref.chosen_logps[rows],
            ref.rejected_logps[rows],
            config=dataclasses.replace(self.cfg.loss, beta=beta),
            chosen_tokens=scores.chosen_tokens,
            rejected_tokens=scores.rejected_tokens,
            chosen_aligned=scores.chosen_aligned,
            rejected_aligned=scores.rejected_aligned,
            chosen_raw=scores.chosen_raw,
        )
        margins = out.chosen_rewards - out.rejected_rewards
        # each pair holds its batch's router loss: the mean is the batches' mean weighted by
        # their pairs, as TRL weights its eval batches' losses
        aux = float(scores.router_loss.double().mean()) if coef else None
        metrics = {
            "eval/loss": float(out.losses.mean()) + (coef * aux if aux is not None else 0.0),
            "eval/rewards/chosen": float(out.chosen_rewards.mean()),
            "eval/rewards/rejected": float(out.rejected_rewards.mean()),
            "eval/rewards/accuracies": float((margins > 0).float().mean()),
            "eval/rewards/margins": float(margins.mean()),
            "eval/logps/chosen": float(scores.chosen_logps.mean()),
            "eval/logps/rejected": float(scores.rejected_logps.mean()),
            "eval/preference_accuracy": float((scores.gamma > 0).float().mean()),
            "eval/gamma": float(scores.gamma.mean()),
            **(
                {f"eval/{k}": v for k, v in scores.token_metrics().items()}
                if self.cfg.log.token_metrics
                else {}
            ),
            "eval/num_tokens": num_tokens,
            **({"eval/aux_loss": aux} if aux is not None else {}),
        }
        if distributed.is_main():
            record = {"step": run_step, "run_step": run_step, "sdpo_step": t, **metrics}
            append_jsonl(self.out / "metrics.jsonl", record)
            self.trackers.log(metrics, step=run_step)  # sdpo_step: logged with the training
        _log(
            f"eval at run step {run_step} (sDPO step {t}): preference accuracy {metrics['eval/preference_accuracy']:.3f}, "
            f"mean γ {metrics['eval/gamma']:.3f} over {len(self.eval_pairs)} held-out pairs"
        )
        return metrics

    def _attach_adapter(
        self,
        model: torch.nn.Module,
        *,
        t: int,
        base_fp: str | None,
        point: ResumePoint | None,
        resume: dict[str, Any] | None,
    ) -> None:
        """Attach step t's fresh LoRA adapter (seeded from train.seed and t); resuming inside
        the step, load the adapter saved with the checkpoint, after checking that the frozen
        base is the one it was trained on."""
        lora = self.cfg.lora
        if resume is not None and point is not None:
            saved_fp = point.progress.get("lora_base")
            # an earlier release's fingerprint of the same base (before the adapter is on it)
            if saved_fp != base_fp and saved_fp not in self._earlier_fingerprints(model, base_fp):
                where = self.cfg.model.path if t == 1 else self.out / f"step-{t - 1}"
                raise OutputDirError(
                    f"cannot resume inside sDPO step {t} from {point.path}: its LoRA adapter was "
                    f"trained on other base weights than {where} holds now (the model files "
                    "changed since). Restore them, or start the run again with --overwrite"
                )
        attach_lora(
            model,
            rank=lora.rank,
            alpha=lora.alpha,
            dropout=lora.dropout,
            targets=lora.targets,
            use_rslora=lora.use_rslora,
            seed=lora_seed(self.cfg.train.seed, t),
        )
        if resume is None or point is None:
            return
        load_lora_state_dict(model, load_file(point.path / ADAPTER_STATE_NAME))

    def _warn_merge_rounding(
        self, model: torch.nn.Module, rounding: torch.Tensor, *, t: int
    ) -> None:
        """Say so when rounding the merged weights to their dtype (bf16 under
        ``train.precision = "bf16"``) dropped a tenth or more of step t's update (``merge_lora``'s
        squared norms): M_t, the next step's reference and ``step-<t>/`` then hold less than the
        adapter learned, though the step's metrics (measured with the adapter) show all of it.
        A collective when sharded (each rank merged its own rows)."""
        if sharding.is_sharded(model):
            rounding = rounding.to(self.device)
            distributed.all_reduce_sum([rounding])
        lost = merge_rounding_loss(rounding.cpu())
        if lost >= 0.1:
            _log(
                f"warning: merging step {t}'s LoRA adapter into the "
                f"{parameter_dtype(self.precision)} weights rounded away {lost:.0%} of its update "
                f"(norm of the dropped part over the update's): step-{t}/ and the next step's "
                "reference keep only the rest, while the step's metrics show the adapter's whole "
                'effect. train.precision = "bf16-mixed" keeps fp32 base weights that hold it'
            )

    def _write_peft_adapter(
        self,
        state: dict[str, torch.Tensor],
        tmp: Path,
        *,
        base_model: str,
        revision: str | None,
    ) -> None:
        """Write one step's adapter in PEFT's layout into ``tmp/adapter/`` (inside the step
        folder's atomic write), loadable with PEFT onto its base M_{t-1} (``base_model``, at a
        hub model's commit ``revision``)."""
        lora = self.cfg.lora
        tensors, config = peft_adapter_files(
            state,
            rank=lora.rank,
            alpha=lora.alpha,
            dropout=lora.dropout,
            targets=lora.targets,
            use_rslora=lora.use_rslora,
            base_model=base_model,
            revision=revision,
        )
        folder = tmp / PEFT_ADAPTER_DIR
        folder.mkdir()
        save_file(tensors, str(folder / PEFT_WEIGHTS_NAME), metadata={"format": "pt"})
        (folder / PEFT_CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    def _profiler(self, t: int) -> StepProfiler | None:
        """``[profile]``'s window when sDPO step ``t`` is the one it traces."""
        prof = self.cfg.profile
        if not prof.steps or t != prof.sdpo_step:
            return None
        return StepProfiler(
            out_dir=self.out / PROFILE_DIR,
            name=f"sdpo-step-{t}",
            first=prof.start_step,
            steps=prof.steps,
            device=self.device,
            memory=prof.memory,
            with_stack=prof.with_stack,
            history_running=self._records_memory_history,
            log=_log,
        )

    def _load_model(self, path: Path) -> torch.nn.Module:
        """The model in checkpoint folder ``path`` (the policy, or a separate reference), set up
        for this run: compiled layers if asked, and sharded under ``train.fsdp`` (built on the
        meta device and sharded there, then each rank reads only its own shards,
        ``load_pretrained(shard=...)``)."""
        self.phase = LOADING
        fault_point("model_load")
        dtype = parameter_dtype(self.precision)
        implementation = self.cfg.model.implementation
        if resolve_implementation(path, implementation) == "transformers":
            # a PackedCausalLM; the settings that need sdpo's decoder were refused before
            model = load_model(path, implementation=implementation, dtype=dtype, device=self.device)
            if self.cfg.model.gradient_checkpointing:
                model.enable_gradient_checkpointing()
            return model
        if sharding.wanted(self.cfg.train.fsdp):
            return load_pretrained(path, dtype=dtype, device=self.device, shard=self._set_up)
        return self._set_up(load_pretrained(path, dtype=dtype, device=self.device))

    def _set_up(self, model: torch.nn.Module) -> torch.nn.Module:
        """The run's model settings on a freshly built policy (on the meta device when it is
        to be sharded: compiling and sharding read no weight)."""
        model.attn_backend = self.cfg.model.attn_backend
        model.gradient_checkpointing = self.cfg.model.gradient_checkpointing
        model.checkpoint_every = self.cfg.model.checkpoint_every
        if self.cfg.model.compile:
            # regional: each decoder layer, dynamic shapes; under FSDP each compiled layer is
            # then one FSDP unit whose gathers and reshards run around its compiled forward
            compile_decoder_layers(
                model, activation_memory_budget=self.cfg.model.activation_memory_budget
            )
        if sharding.wanted(self.cfg.train.fsdp):
            sharding.shard_model(model, precision=self.precision, device=self.device)
        return model

    def _gathered(self, model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
        """A sharded model's whole state dict on rank 0 (a collective: every rank calls it);
        None for a plain model (its own ``state_dict()`` is used)."""
        return sharding.full_state_dict(model) if sharding.is_sharded(model) else None

    def _fingerprint(self, model: torch.nn.Module) -> str:
        """``model_fingerprint``; a sharded model's is rank 0's over the gathered weights (the
        unsharded model's), given to every rank."""
        return self._over_weights(model, partial(model_fingerprint, model))

    def _fingerprint_with(self, model: torch.nn.Module, architecture: str) -> str:
        """``fingerprint_with``, sharded as ``_fingerprint``."""
        return self._over_weights(model, partial(fingerprint_with, model, architecture))

    def _earlier_fingerprints(self, model: torch.nn.Module, fingerprint: str) -> list[str]:
        """``earlier_model_fingerprints`` of the weights ``fingerprint`` names, sharded as
        ``_fingerprint`` and hashed once per fingerprint; [] at once (no collective) for a
        model no earlier release fingerprinted otherwise."""
        if not earlier_architecture_texts(model):
            return []
        if fingerprint not in self._earlier_fps:
            self._earlier_fps[fingerprint] = self._over_weights(
                model, partial(earlier_model_fingerprints, model)
            )
        return self._earlier_fps[fingerprint]

    @staticmethod
    def _over_weights(model: torch.nn.Module, digest: Callable[..., Any]) -> Any:
        """``digest()`` of the model's weights; a sharded model's is rank 0's over the gathered
        weights (``digest(state=...)``), given to every rank."""
        if not sharding.is_sharded(model):
            return digest()
        weights = sharding.full_state_dict(model)
        return distributed.broadcast_object(
            digest(state=weights) if distributed.is_main() else None
        )

    @contextlib.contextmanager
    def _stop_signals(self) -> Iterator[None]:
        """SIGTERM/SIGINT ask for a graceful stop. While training: finish the optimizer step
        (or the train.eval_every pass that follows one), save, stop. Before (loading a model, a
        scoring pass) or between sDPO steps: finish what is under way (a reference pass's
        values are cached), then stop before the next optimizer step (``_stop_if_asked``). A
        second SIGINT aborts at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            if self.stop_flag and signum == signal.SIGINT:
                raise KeyboardInterrupt
            name = signal.Signals(signum).name
            if self.stop_flag:  # a SIGTERM again: the first one's stop is on its way
                _log(f"{name} received: the stop asked for before is under way")
                return
            evaluating = None
            if self.in_optimizer_steps and self.evaluating_after is not None:
                evaluating = (self.evaluating_after, len(self.eval_pairs))
            message = stop_received_message(
                name,
                phase=self.phase,
                trainer=self.trainer if self.in_optimizer_steps else None,
                evaluating=evaluating,
            )
            self.stop_flag = True
            _log(message)

        old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def _stop_if_asked(self, optimizer_steps: int) -> None:
        """Stop here, outside training, when a graceful stop was asked for (on any rank: every
        rank stops at the same place); ``optimizer_steps``: the run's steps done so far."""
        if distributed.any_rank(self.stop_flag):
            raise TrainingStopped(optimizer_steps)

    def _next_chunk_gamma(
        self,
        t: int,
        chunks: list[list[int]],
        by_index: dict[int, TokenizedPair],
        model: torch.nn.Module,
        ref: PairLogps,
        initial: PairLogps | None,
    ) -> float | None:
        """Mean γ of step t's reference on chunk t+1 (the paper's Figure 2 quantity). Free for
        step 1 and for a fixed reference (both scored all data); a scoring pass otherwise."""
        if t >= len(chunks) or (
            t == 1 and self.scores_chunk_one_only and not self.cfg.sdpo.reference
        ):
            return None
        upcoming = torch.tensor(chunks[t], dtype=torch.int64)
        if self.cfg.sdpo.reference or t == 1:
            source = ref if self.cfg.sdpo.reference else initial
        elif self.cfg.sdpo.report_scoring:
            source = self.score(model, [by_index[i] for i in chunks[t]])
        else:
            return None
        return float(source.gamma[source.rows_for(upcoming)].mean())

    def _score_with_separate_reference(
        self, ref_dir: Path, pairs: Sequence[TokenizedPair], point: ResumePoint | None
    ) -> PairLogps:
        """Load the named reference (set up as the policy is: sharded under ``train.fsdp``, so a
        reference larger than one GPU loads; compiled layers under ``model.compile``), score
        every pair, write the cache, free the model. On resume its weights must be the run's."""
        baseline = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0
        ref_model = self._load_model(ref_dir)
        probe = weakref.ref(ref_model.lm_head_weight)
        fingerprint = self._check_same_weights(
            point, "reference", self._fingerprint(ref_model), "sdpo.reference", ref_model
        )
        self._stop_if_asked(point.progress["run_step"] if point is not None else 0)
        values = self.cached_reference("reference", ref_model, fingerprint, pairs)
        del ref_model
        gc.collect()
        if probe() is not None:
            raise RuntimeError("the reference model is still referenced after caching its values")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            now = torch.cuda.memory_allocated(self.device)
            _log(
                f"reference model freed: GPU memory {now / 2**20:.0f} MiB (before load {baseline / 2**20:.0f} MiB)"
            )
        return values


def _section_defaults() -> dict[str, Any]:
    """Every section's default values (as ``config_to_dict`` writes them, Nones left out): what
    a config saved before a key existed meant by leaving it out."""
    hints = typing.get_type_hints(RunConfig)
    out = {}
    for f in dataclasses.fields(RunConfig):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out[f.name] = {k: v for k, v in dataclasses.asdict(tp()).items() if v is not None}
    return out


def changed_config_keys(
    saved: dict[str, Any], now: dict[str, Any], *, rounding: bool = False
) -> list[str]:
    """``"key (old -> new)"`` for every config key whose change would alter the result; with
    ``rounding``, for every changed key that alters it only up to float rounding
    (``rounding_only_keys``) instead. A key the saved config lacks (written by a version before
    the key existed) counts as its default."""

    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    a, b = flat(_with_source_defaults(saved)), flat(_with_source_defaults(now))
    for k, v in flat(_section_defaults()).items():
        a.setdefault(k, v)
        b.setdefault(k, v)
    loose = rounding_only_keys(now)
    keys = sorted((set(a) | set(b)) - (RESUME_SAFE_KEYS - loose))
    keys = [k for k in keys if (k in loose) == rounding]
    return [f"{k} ({a.get(k)!r} -> {b.get(k)!r})" for k in keys if a.get(k) != b.get(k)]


def _with_precision(config: dict[str, Any], precision: str | None) -> dict[str, Any]:
    """``config`` with ``train.precision`` set to ``precision`` (None: as it is)."""
    if precision is None:
        return config
    return {**config, "train": {**config.get("train", {}), "precision": precision}}


def _with_source_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with every data source's keys that a config saved before they existed lacks
    (``subset``; the columns ``tools`` and ``chat_template_kwargs``) at their defaults."""
    data = config.get("data")
    if not isinstance(data, dict):
        return config
    column_defaults = dataclasses.asdict(ColumnMap())

    def filled(src: Any) -> Any:
        if not isinstance(src, dict):
            return src
        columns = src.get("columns", {})
        if isinstance(columns, dict):
            columns = {**column_defaults, **columns}
        return {"subset": None, **src, "columns": columns}

    data = dict(data)
    for key in ("sources", "eval_sources"):
        if isinstance(data.get(key), list):
            data[key] = [filled(src) for src in data[key]]
    return {**config, "data": data}


def _config_value(config: dict[str, Any], key: str) -> Any:
    """``config``'s value of the dotted ``key``; one it lacks (an older version's) its default."""
    section, name = key.split(".", 1)
    values = config.get(section, {})
    if name in values:
        return values[name]
    return _section_defaults().get(section, {}).get(name)


def beyond_rounding(
    saved: dict[str, Any],
    now: dict[str, Any],
    changed: Sequence[str],
    *,
    router_loss: bool,
    held_out: bool,
) -> list[str]:
    """Why the ``changed`` compute settings (``rounding_only_keys``) between the ``saved``
    config and ``now`` change this run's result beyond float rounding (none: they change it only
    in rounding). ``router_loss``: a mixture of experts trained with its router load-balancing
    loss, which each forward computes over its batch's tokens, so other micro-batches give
    another loss and other gradients, and other scoring batches another ``eval/aux_loss``;
    ``held_out``: the run evaluates held-out pairs. With LoRA dropout, compiled layers draw
    their own dropout masks, not those eager code draws."""
    out = []
    if router_loss and "train.max_tokens_per_batch" in changed:
        out.append(
            "train.max_tokens_per_batch with a mixture of experts: its router load-balancing "
            "loss is computed over each micro-batch's tokens, so other micro-batches give another "
            "loss and other gradients"
        )

    def budget(config: dict[str, Any]) -> int:
        return _config_value(config, "sdpo.score_tokens_per_batch") or 4 * _config_value(
            config, "train.max_tokens_per_batch"
        )

    if router_loss and held_out and budget(saved) != budget(now):
        out.append(
            f"the scoring batches ({budget(saved)} -> {budget(now)} tokens, "
            "sdpo.score_tokens_per_batch or 4 x train.max_tokens_per_batch) with a mixture of "
            "experts: eval/aux_loss and eval/loss hold each scoring batch's router loss, over "
            "its tokens"
        )
    dropout = _config_value(now, "lora.dropout") if _config_value(now, "lora.rank") else 0.0
    if dropout and "model.compile" in changed:
        out.append(
            f"model.compile with lora.dropout = {dropout}: compiled layers draw other dropout "
            "masks than eager ones, so the steps still to run train on other masks"
        )
    return out


def rounding_only_keys(config: dict[str, Any]) -> frozenset[str]:
    """Keys that set how the work is batched, kept or computed, not what is computed: a run may
    resume with them changed (e.g. after running out of GPU memory), and then ends equal to
    the uninterrupted run up to float rounding. ``train.max_tokens_per_batch`` is one of them
    only when ``train.pairs_per_step`` or ``tokens_per_step`` fixes the optimizer steps;
    otherwise it sets the step size. ``sdpo.report_scoring`` is one of them under a random or
    given partition: it sets which pairs the initial model scores (all, or chunk 1 alone), so
    step 1's reference values are scored in other batches."""
    keys = set(RESUME_ROUNDING_KEYS)
    train = config.get("train", {})
    if train.get("pairs_per_step") is not None or train.get("tokens_per_step") is not None:
        keys.add("train.max_tokens_per_batch")
    if config.get("sdpo", {}).get("partition", SDPOSection.partition) in ("random", "given"):
        keys.add("sdpo.report_scoring")
    return frozenset(keys)


def stop_received_message(
    name: str,
    *,
    phase: str,
    trainer: DPOTrainer | None,
    evaluating: tuple[int, int] | None = None,
) -> str:
    """What a graceful stop asked for now (signal ``name``) does. ``trainer``: the one whose
    ``fit`` runs (None outside optimizer steps, during ``phase``); ``evaluating``: the run's
    step a ``train.eval_every`` pass follows and its pair count. One process, the stop follows
    the step under way (or the eval pass); data parallel, it may follow a later step, or one
    in which another rank's stop was agreed already (``DPOTrainer.stop_takes_effect_after``),
    which the message names."""
    again = "(Ctrl-C again aborts at once)"
    if trainer is None:
        return (
            f"{name} received while {phase}: finishing that, then stopping before the next "
            f"optimizer step {again}"
        )
    base = trainer.run_step_base or 0
    at, under_way = base + trainer.stop_takes_effect_after(), base + trainer.step_begun
    agreed = (
        "(data parallel: the ranks agree on a stop in an optimizer step's all-reduce and act on "
        "it once that step's values are read)"
    )
    if evaluating is not None:
        after, pairs = evaluating
        then = (
            f"then training stops after optimizer step {at} {agreed}, saving a checkpoint"
            if at > after
            else "then saving a checkpoint and stopping"
        )
        return (
            f"{name} received while evaluating {pairs} held-out pairs after optimizer step "
            f"{after} (train.eval_every): finishing the evaluation, {then} {again}"
        )
    if at > under_way:
        return (
            f"{name} received: training stops after optimizer step {at}, not the one under way "
            f"or just done ({under_way}) {agreed}, then saves a checkpoint {again}"
        )
    return (
        f"{name} received: finishing the current optimizer step, then saving a checkpoint and "
        f"stopping {again}"
    )


def _warn_eval_overlap(train: list[TokenizedPair], held_out: list[TokenizedPair]) -> int:
    """Held-out pairs that are also training pairs (the same token ids) make the eval metrics
    measure memorisation: say how many (and return it)."""

    def ids(p: TokenizedPair) -> tuple:
        return tuple(p.prompt_ids), tuple(p.chosen_ids), tuple(p.rejected_ids)

    seen = {ids(p) for p in train}
    both = [p for p in held_out if ids(p) in seen]
    if both:
        names = sorted({p.source for p in both})
        _log(
            f"data: {len(both)} of {len(held_out)} held-out pair(s) (source(s) {names}) are also "
            "training pairs, token for token: their eval metrics measure what was trained on; "
            "remove them from data.eval_sources or from the training data"
        )
    return len(both)


def _check_same_vocabulary(
    model_dir: Path, reference_dir: Path, *, tokenizer: PairTokenizer, vocab_size: int
) -> None:
    """The reference scores the policy's token ids: its tokenizer, when it ships one, must give
    each id below ``vocab_size`` (config.json's, the same in both folders) to the same token as
    ``tokenizer`` (model.path's, as sdpo reads it). Equal vocab_size is not enough (Llama-2 and
    Mistral both have 32,000 tokens), nor is an equal tokenizer.json: the tokens an older
    folder's added_tokens.json adds take ids too. Ids past the embeddings reach neither model
    (a row that holds one is refused), so tokens there may differ."""
    if not (reference_dir / "tokenizer.json").is_file():
        return
    try:
        reference = PairTokenizer.from_dir(reference_dir)
    except ValueError as e:
        raise RunInputError(
            f"sdpo.reference {reference_dir}: its tokenizer cannot be read ({e}); sdpo reads it "
            "only to check that its token ids mean what model.path's do: fix it, or use a "
            "reference whose tokenizer loads"
        ) from None
    ours, theirs = tokenizer.ids_below(vocab_size), reference.ids_below(vocab_size)
    if ours == theirs:
        return
    by_id: list[dict[int, str]] = [{}, {}]
    for side, vocab in zip(by_id, (ours, theirs), strict=True):
        for token, i in vocab.items():
            side.setdefault(i, token)
    first = min(i for t, i in set(ours.items()) ^ set(theirs.items()))
    folders = (model_dir, reference_dir)
    # which side's token at that id only its added_tokens.json adds (tokenizer.json lacks it)
    from_file = [first in t.added_file_tokens for t in (tokenizer, reference)]
    described = [
        (repr(side[first]) if first in side else "no token")
        + f" in {folder}"
        + (f" (its {ADDED_TOKENS_FILE})" if added else "")
        for side, folder, added in zip(by_id, folders, from_file, strict=True)
    ]
    why = "" if any(from_file) else " (their tokenizer.json or tokenizer_config.json differ)"
    fix = "use a reference of the same tokenizer"
    if from_file[0] != from_file[1]:
        having, lacking = folders if from_file[0] else folders[::-1]
        if (
            first not in by_id[folders.index(lacking)]
            and not (lacking / ADDED_TOKENS_FILE).exists()
        ):
            fix = (
                f"{lacking} has no {ADDED_TOKENS_FILE} (a step folder written by sdpo before "
                "step folders carried that file lacks it): if its model was trained from "
                f"{having}'s, copy {having / ADDED_TOKENS_FILE} into {lacking}; otherwise " + fix
            )
    raise RunInputError(
        f"sdpo.reference {reference_dir} has another tokenizer than model.path {model_dir}: id "
        f"{first} is {described[0]} but {described[1]}{why}, so the reference would score "
        f"token ids that mean other text to it; {fix}"
    )


def check_writable_folder(out: Path, key: str = "output_dir") -> None:
    """``out`` (the value of ``key``) is a folder the run can write in, or can be made as one:
    checked before any input is read, with a probe file created and removed at once (nothing
    is left behind)."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "is a file" if existing == out else f"cannot be made: {existing} is a file"
        raise OutputDirError(f"{key} {out} {what}, not a folder; choose another {key}")
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".sdpo-write-check-"):
            pass
    except OSError as e:
        where = "" if existing == out else f" ({existing}, where it would be made)"
        raise OutputDirError(
            f"{key} {out} is not writable{where}: {e.strerror or e}; choose another "
            f"{key} or fix its permissions"
        ) from None


def existing_outputs(out: Path) -> list[Path]:
    """Files and folders of a previous run inside ``out`` (caches excluded)."""
    if not out.is_dir():
        return []
    names = {
        "metrics.jsonl",
        "config.toml",
        "sdpo_report.json",
        "sdpo_steps.png",
        CHECKPOINTS_DIR,
        TENSORBOARD_DIR,
        TRACKING_STATE,
        PROFILE_DIR,
    }
    return [p for p in out.iterdir() if p.name in names or p.name.startswith("step-")]


def lora_seed(seed: int, t: int) -> int:
    """The seed of sDPO step t's fresh LoRA adapter (its A matrices), from ``train.seed``."""
    return seed * 65_537 + t


def processing_files(model_dir: Path) -> list[Path]:
    """The tokenizer, chat template and processor files (``PROCESSING_FILES``) a model folder
    has, and the folders of its processor's other tokenizers (``processor_tokenizer_folders``),
    copied into every saved checkpoint."""
    files = [model_dir / name for name in PROCESSING_FILES if (model_dir / name).exists()]
    return files + processor_tokenizer_folders(model_dir)


def processor_tokenizer_folders(model_dir: Path) -> list[Path]:
    """The subfolders of ``model_dir`` that hold a tokenizer of its processor besides the
    model's own. transformers' ``AutoProcessor`` loads each tokenizer a processor takes besides
    ``tokenizer`` (an argument whose name holds "tokenizer": InstructBLIP's
    ``qformer_tokenizer``, Evolla's ``protein_tokenizer``, ...) from the subfolder of that name
    (``AutoTokenizer.from_pretrained(subfolder=...)``), and where the subfolder is missing takes
    the model's own tokenizer instead, with a warning only. So every subfolder whose name holds
    "tokenizer" and that holds ``AutoTokenizer``'s files (``tokenizer_config.json`` or
    ``tokenizer.json``) is copied whole."""
    return [
        folder
        for folder in sorted(model_dir.iterdir())
        if folder.is_dir()
        and "tokenizer" in folder.name
        and any((folder / name).is_file() for name in ("tokenizer_config.json", "tokenizer.json"))
    ]


def _train_config(cfg: RunConfig, precision: str) -> TrainConfig:
    """``train.*`` with the run's resolved precision (a resume's: the one it started with)."""
    return dataclasses.replace(cfg.train, precision=precision)


def run_training(
    cfg: RunConfig, *, progress: bool = True, overwrite: bool = False, resume: bool = False
) -> RunResult:
    return StepwiseRunner(cfg, progress=progress, overwrite=overwrite, resume=resume).run()
