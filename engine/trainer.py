"""The DPO training loop: one policy, cached reference values, padding-free token-budget batches.

The loop owns the optimizer, the schedule, gradient accumulation, clipping, metrics, the progress
bar and checkpoints. It knows nothing of a particular loss: it takes a per-pair loss function
(the DPO family in ``sdpo.losses`` has the right shape) and the reference log-probs as a table,
so the same loop serves plain DPO, every sDPO step, and users who embed it.

One optimizer step = a fixed group of pairs (``pairs_per_step``, or pairs up to
``tokens_per_step`` real tokens), processed as micro-batches of at most
``max_tokens_per_batch`` tokens. The loss of a step is the mean over its pairs, so the result
does not depend on how the step is cut into micro-batches.

Resume: ``state_dict`` holds everything exact continuation needs beside the weights (optimizer,
LR schedule, RNG states, position in the step plan, which is rebuilt from the seed), and
``fit(..., resume_state=...)`` continues from it to the same bits. A callback writes checkpoints
every ``save_every`` steps; ``stop_requested`` (set by a signal handler) makes the loop finish the
current optimizer step (data parallel, it may be a later one: ``stop_takes_effect_after``), save,
and raise ``TrainingStopped``. A step with a non-finite loss or
gradient is not applied, and the run stops with ``NonFiniteError`` unless
``skip_nonfinite_batches`` allows skipping it.

Host reads. With fused AdamW (the default on CUDA) a step never waits for the device: the
finite flag gates the update inside the optimizer kernel (``found_inf``), and the step's metrics,
finite flag and stop flag are copied to pinned host memory behind an event (``_HostValues``).
``fit`` reads them after it has queued the next step, so the device is never idle between steps;
a device-side count of non-finite steps blocks every update after the one that exceeds
``skip_nonfinite_batches``, so the weights are those before the step the error names. Before a
checkpoint, an evaluation, a stop and the last step the loop reads the current step's values
at once. Other optimizers need the flag before their update: one host read per step.

Data parallel (a process group of more than one rank, ``sdpo.engine.distributed``): every rank
builds the same step plan and calls ``train_step`` with the step's *global* micro-batches; each
rank runs its share (``shard_micro_batches``), the loss divided by the step's global pair count,
and SUM all-reduces give every rank the single-process gradient (bucketed and started during the
backward of the rank's last micro-batch, ``distributed.GradReducer``; ``overlap_grad_reduce =
false``: one all-reduce after it) and the step's metric sums (and the stop flag). Clipping, the
non-finite check and the update then see the same values on every rank, so the weights stay
identical. Only rank 0 writes ``metrics.jsonl`` and shows the
progress bar.

Sharded (``train.fsdp``, ``engine/sharding.py``): FSDP2 reduce-scatters the gradients of its
sharded parameters in the backward. Trainable parameters that are whole on every rank (a LoRA
adapter on a sharded base, ``engine/lora.py``) are summed over ranks in one all-reduce after
the step's last pass (with the metric sums), and their optimizer state, whole on every rank
too, is saved and loaded in the plain form.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sdpo.engine import distributed, sharding
from sdpo.engine.files import append_jsonl, atomic_open
from sdpo.engine.hf import (
    apply_router_aux_loss_coef,
    fp32_kept_tensors,
    peft_adapter_parameters,
)
from sdpo.engine.lora import adapter_parameters
from sdpo.engine.packing import (
    TokenizedPair,
    batch_by_token_budget,
    check_ld_alpha,
    check_packable,
    check_pairs,
    check_token_ids,
    head_rows,
    pack_pairs,
    pack_pairs_shared,
    to_device,
)
from sdpo.engine.precision import (
    PRECISIONS,
    autocast_context,
    head_inputs,
    parameter_dtype,
)
from sdpo.engine.profiling import StepProfiler
from sdpo.engine.resume import fault_point
from sdpo.engine.scoring import PairLogps, check_packed_model, logprob_head
from sdpo.kernels import linear_pair_loss

SCHEDULES = ("linear", "cosine", "constant")
# the metrics of an optimizer step, each logged under its name (as TRL 1.16 names it); their
# sums of one micro-batch (``DPOTrainer._micro_batch``), with the token counts, are reduced over
# ranks as one vector in this order
METRIC_KEYS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    # token metrics, divided by token counts, not by pairs: TOKEN_METRICS
    "entropy",
    "logits/chosen",
    "logits/rejected",
    "mean_token_accuracy",
)
# each token metric: its sum's key in METRIC_KEYS and the token counts it is divided by (as TRL
# 1.16 logs them: the entropy over the chosen and rejected completion tokens, the mean logit of
# each side over its own tokens, the top-1 accuracy over the chosen tokens)
TOKEN_METRICS = {
    "entropy": ("tokens/chosen", "tokens/rejected"),
    "logits/chosen": ("tokens/chosen",),
    "logits/rejected": ("tokens/rejected",),
    "mean_token_accuracy": ("tokens/chosen",),
}
# the completion tokens of each side (not logged): the token metrics' denominators
TOKEN_COUNTS = ("tokens/chosen", "tokens/rejected")
REDUCED_KEYS = METRIC_KEYS + TOKEN_COUNTS
LOSS_PATHS = ("fused", "plain")

# (policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, chosen_tokens, rejected_tokens)
#   -> an object with per-pair ``losses``, ``chosen_rewards`` and ``rejected_rewards`` (P,)
PairLossFn = Callable[..., Any]


@dataclass(kw_only=True)
class TrainConfig:
    """Optimisation settings of one DPO training (one sDPO step); the ``[train]`` section of a
    run's TOML config is this class. Errors name the key, so the config reader can prefix it
    with ``train.``."""

    learning_rate: float = 5e-7
    epochs: int = 1
    max_tokens_per_batch: int = 16384  # packed tokens per forward/backward (chosen + rejected)
    pairs_per_step: int | None = None  # pairs per optimizer step ...
    tokens_per_step: int | None = None  # ... or real tokens per step; neither: one batch
    warmup_ratio: float = 0.1
    # warm-up optimizer steps; set, it replaces warmup_ratio (as TRL's warmup_steps does)
    warmup_steps: int | None = None
    schedule: str = "linear"  # "linear" | "cosine" | "constant", after linear warm-up
    weight_decay: float = 0.0  # on matrices only
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0  # 0: no clipping
    seed: int = 0
    shuffle: bool = True
    log_every: int = 1  # optimizer steps
    save_every: int = 0  # optimizer steps; 0: checkpoints only at the end of each sDPO step
    # optimizer steps between evaluations of the held-out pairs inside an sDPO step (TRL's
    # eval_steps); 0: only at the end of each sDPO step
    eval_every: int = 0
    precision: str = "auto"  # "fp32" | "bf16" (bf16 params+states) | "bf16-mixed" (fp32 master)
    loss_path: str = "fused"  # "fused": loss formed inside the chunked lm_head; "plain"
    keep_checkpoints: int = 2  # training checkpoints kept on disk (read by the runner)
    skip_nonfinite_batches: int = 0  # optimizer steps with a NaN/inf loss or gradient to skip
    # Compute each pair's prompt once (chosen and rejected attend to the same prompt rows), in
    # training and in the scoring passes; results equal the unshared layout's up to rounding.
    # Token budgets, step plans and tokens/s still count the prompt twice (see engine/packing.py).
    share_prompt: bool = False
    # Shard parameters, gradients and optimizer states over the ranks (FSDP2, see
    # engine/sharding.py); only under torchrun with more than one rank, a no-op otherwise.
    fsdp: bool = False
    # Data parallel without fsdp: sum the gradients over ranks in buckets started during the
    # backward of each rank's last micro-batch (as DDP does); false: one all-reduce after it.
    overlap_grad_reduce: bool = True
    # Checkpoints (mid-step and end-of-step, read by the runner) are copied to host memory at the
    # save point and written by a background thread while training goes on (engine/async_save.py)
    async_save: bool = False
    # Before training, run the largest micro-batch's forward and backward once (the gradients
    # and every RNG state are then restored), so that a batch too large for the GPU fails in
    # the first seconds, not hours in; the peak memory is reported. None: on CUDA only.
    memory_probe: bool | None = None

    def __post_init__(self) -> None:
        def at_least(name: str, low: float, *, strict: bool = False) -> None:
            value = getattr(self, name)
            if value is None:
                return
            if not math.isfinite(value) or (value <= low if strict else value < low):
                raise ValueError(f"{name} must be {'>' if strict else '>='} {low}, got {value!r}")

        def one_of(name: str, options: tuple[str, ...]) -> None:
            value = getattr(self, name)
            if value not in options:
                raise ValueError(
                    f"{name} = {value!r} is not an option: use one of "
                    + ", ".join(map(repr, options))
                )

        at_least("learning_rate", 0.0, strict=True)
        at_least("epochs", 1)
        at_least("max_tokens_per_batch", 2)
        at_least("pairs_per_step", 1)
        at_least("tokens_per_step", 2)
        if self.pairs_per_step is not None and self.tokens_per_step is not None:
            raise ValueError(
                "tokens_per_step and pairs_per_step are both set: gradient accumulation is "
                "counted in one unit, keep one of them"
            )
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.warmup_steps is not None and (
            isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int)
        ):
            raise ValueError(f"warmup_steps must be a whole number, got {self.warmup_steps!r}")
        at_least("warmup_steps", 0)
        one_of("schedule", SCHEDULES)
        at_least("weight_decay", 0.0)
        self.adam_betas = list(self.adam_betas)
        if len(self.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas}")
        at_least("adam_eps", 0.0, strict=True)
        at_least("max_grad_norm", 0.0)
        at_least("seed", 0)
        at_least("log_every", 1)
        at_least("save_every", 0)
        at_least("eval_every", 0)
        one_of("precision", PRECISIONS)
        one_of("loss_path", LOSS_PATHS)
        at_least("keep_checkpoints", 1)
        at_least("skip_nonfinite_batches", 0)
        if not isinstance(self.share_prompt, bool):
            raise ValueError(f"share_prompt must be true or false, got {self.share_prompt!r}")
        if not isinstance(self.fsdp, bool):
            raise ValueError(f"fsdp must be true or false, got {self.fsdp!r}")
        if self.memory_probe is not None and not isinstance(self.memory_probe, bool):
            raise ValueError(
                f"memory_probe must be true, false or unset (auto), got {self.memory_probe!r}"
            )
        if not isinstance(self.overlap_grad_reduce, bool):
            raise ValueError(
                f"overlap_grad_reduce must be true or false, got {self.overlap_grad_reduce!r}"
            )
        if not isinstance(self.async_save, bool):
            raise ValueError(f"async_save must be true or false, got {self.async_save!r}")


def plan_steps(
    pairs: Sequence[TokenizedPair], config: TrainConfig, *, epoch: int
) -> list[list[list[int]]]:
    """Optimizer steps of one epoch, each a list of micro-batches of positions into ``pairs``.

    The pair order is a seeded permutation per epoch (or the given order without shuffling), so
    a run is reproducible and a resumed run can rebuild exactly the same plan."""
    order = list(range(len(pairs)))
    if config.shuffle:
        random.Random(config.seed * 1_000_003 + epoch).shuffle(order)
    groups: list[list[int]] = []
    if config.pairs_per_step is not None:
        groups = [
            order[i : i + config.pairs_per_step]
            for i in range(0, len(order), config.pairs_per_step)
        ]
    else:
        budget = config.tokens_per_step or config.max_tokens_per_batch
        current: list[int] = []
        tokens = 0
        for pos in order:
            size = pairs[pos].num_tokens
            if current and tokens + size > budget:
                groups.append(current)
                current, tokens = [], 0
            current.append(pos)
            tokens += size
        if current:
            groups.append(current)
    steps = []
    for group in groups:
        micro = batch_by_token_budget(
            [pairs[i] for i in group], max_tokens=config.max_tokens_per_batch, shuffle=False
        )
        steps.append([[group[j] for j in batch] for batch in micro])
    return steps


def shard_micro_batches(
    pairs: Sequence[TokenizedPair],
    micro_batches: list[list[int]],
    *,
    world_size: int,
    rank: int,
    max_tokens: int,
    whole_micro_batches: bool = False,
) -> list[list[int]]:
    """This rank's share of one optimizer step (positions into ``pairs``), about equal in tokens.

    With at least as many micro-batches as ranks, whole micro-batches are dealt out, largest
    first, each to the rank with the fewest tokens so far (``distributed.balanced_owners``); a
    rank keeps its micro-batches in plan order. With fewer micro-batches than ranks, the step's
    pairs are dealt out the same way one by one (a pair is never split) and each rank cuts its
    pairs into micro-batches of at most ``max_tokens`` (``batch_by_token_budget``); a rank may
    then get nothing (a step of fewer pairs than ranks). ``whole_micro_batches``: the plan's
    micro-batches are dealt out whole also then (ranks past their number get none), for a loss
    that is not a sum over pairs (a mixture of experts' router loss over each micro-batch's
    tokens), so that each rank computes it over the micro-batches one process would. Every rank
    computes the same division from the same plan, without communicating."""
    if world_size == 1:
        return micro_batches
    if len(micro_batches) >= world_size or whole_micro_batches:
        sizes = [sum(pairs[i].num_tokens for i in batch) for batch in micro_batches]
        owners = distributed.balanced_owners(sizes, world_size)
        return [b for b, owner in zip(micro_batches, owners, strict=True) if owner == rank]
    flat = [i for batch in micro_batches for i in batch]
    owners = distributed.balanced_owners([pairs[i].num_tokens for i in flat], world_size)
    mine = [i for i, owner in zip(flat, owners, strict=True) if owner == rank]
    if not mine:
        return []
    cut = batch_by_token_budget([pairs[i] for i in mine], max_tokens=max_tokens, shuffle=False)
    return [[mine[j] for j in batch] for batch in cut]


def build_optimizer(
    model: torch.nn.Module, config: TrainConfig, *, fused: bool | None = None
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (``requires_grad``: with LoRA, the adapter's only);
    weight decay only on matrices (not norms or biases).

    ``fused`` (default: on CUDA only) picks torch's fused kernel, which also takes the
    gradient-clipping scale and the skip-on-non-finite flag as device tensors (see
    ``DPOTrainer.train_step``); otherwise the multi-tensor (foreach) implementation.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    use_fused = all(p.is_cuda for p in params) if fused is None else fused
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=config.learning_rate,
        betas=tuple(config.adam_betas),
        eps=config.adam_eps,
        fused=True if use_fused else None,
        foreach=None if use_fused else True,
    )


def create_optimizer_states(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """Make AdamW's states (``exp_avg``, ``exp_avg_sq``, ``step``) for the parameters of
    ``optimizer`` that have none yet, as its first step makes them, and return those
    parameters: deleting their entries from ``optimizer.state`` gives back the state that was
    (a fresh optimizer's: none, no step counted). Made by one step at learning rate 0 over zero
    gradients, which leaves every parameter bit for bit as it was (the decoupled weight decay
    multiplies by 1 - 0 * wd = 1, the update adds -0 * 0 / eps); every gradient is dropped
    before and after, and the LR scheduler's record of a step taken is kept as it was. Only
    torch's Adam and AdamW: for another optimizer nothing is made (returns ``[]``). A step
    that fails part way leaves no state behind."""
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        # another optimizer may ignore the learning rate (a relative step size) or need a
        # closure: its step at lr 0 could change the weights, so none is taken
        return []
    params = [p for group in optimizer.param_groups for p in group["params"]]
    missing = [p for p in params if not optimizer.state.get(p)]
    if not missing:
        return []
    optimizer.zero_grad(set_to_none=True)
    lrs = [group["lr"] for group in optimizer.param_groups]
    called = optimizer.__dict__.get("_opt_called", _ABSENT)
    try:
        for p in missing:
            p.grad = torch.zeros_like(p)
        for group in optimizer.param_groups:
            group["lr"] = 0.0
        optimizer.step()
    except BaseException:
        # a step that failed part way (out of memory while making the states) leaves none of
        # them behind: a later fit must start from a fresh optimizer's state, step counts 0
        for p in missing:
            optimizer.state.pop(p, None)
        raise
    finally:
        for group, lr in zip(optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        if called is _ABSENT:
            optimizer.__dict__.pop("_opt_called", None)
        else:
            optimizer._opt_called = called
        optimizer.zero_grad(set_to_none=True)
    return [p for p in missing if optimizer.state.get(p)]


_ABSENT = object()


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's state tensors held on this rank (a sharded parameter's states
    are its local shard's); AdamW's after a step: 2 x each parameter's bytes, plus its
    4-byte step count (on the device under the fused kernel, in host memory otherwise)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, Tensor):
                local = value.to_local() if sharding.is_dtensor(value) else value
                total += local.numel() * local.element_size()
    return total


def _takes_grad_scale(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step`` honours the ``grad_scale`` / ``found_inf`` tensors (fused
    AdamW does: the protocol torch's GradScaler uses)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and all(
        group.get("fused") for group in optimizer.param_groups
    )


def lr_multiplier(step: int, *, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Learning-rate factor for optimizer step ``step`` (0-based): linear warm-up to 1, then
    linear or cosine decay to 0 (or constant)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class TrainingStopped(Exception):
    """The loop stopped on request after saving a checkpoint (graceful stop)."""

    def __init__(self, global_step: int) -> None:
        super().__init__(f"training stopped on request after optimizer step {global_step}")
        self.global_step = global_step


class NonFiniteError(FloatingPointError):
    """A NaN/inf loss or gradient; the update was not applied. ``pair_indices``: the step's
    pairs (``TokenizedPair.index``)."""

    def __init__(self, message: str, *, pair_indices: list[int]) -> None:
        super().__init__(message)
        self.pair_indices = pair_indices


def _rng_state() -> dict[str, Any]:
    """Every RNG state as tensors and plain lists (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": [version, list(internal), py_gauss],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, py_gauss = state["python"]
    random.setstate((version, tuple(internal), py_gauss))


class _HostValues:
    """Scalar device values (a step's metrics and flags) copied to host memory without waiting
    for the device: on CUDA one copy into pinned memory, an event marking its place in the
    stream; ``read`` waits for that event only, not for the work queued after it."""

    def __init__(self, values: dict[str, Tensor]) -> None:
        self.keys = list(values)
        stacked = torch.stack([v.detach().reshape(()).double() for v in values.values()])
        cuda = stacked.device.type == "cuda"
        self._host = torch.empty(stacked.shape, dtype=torch.float64, pin_memory=cuda)
        self._host.copy_(stacked, non_blocking=cuda)
        self._event = None
        if cuda:
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(stacked.device))

    def read(self) -> dict[str, float]:
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return dict(zip(self.keys, self._host.tolist(), strict=True))


@dataclass(kw_only=True)
class _StepRecord:
    """An optimizer step ``fit`` has queued, waiting for its values to be read."""

    values: _HostValues
    pair_indices: list[int]
    epoch: int  # 0-based
    step_in_epoch: int  # 1-based
    epoch_steps: int  # optimizer steps in this epoch
    global_step: int  # 1-based
    lr: float
    tokens: int  # the step's real tokens
    tokens_so_far: int  # of this pass, this step's included
    step_in_run: int  # 1-based, in this pass
    logging: bool


@dataclass(kw_only=True)
class TrainResult:
    """What one ``DPOTrainer.fit`` call did."""

    optimizer_steps: int  # optimizer steps of the call (a resumed call: all of them)
    tokens: int  # tokens trained, no padding, each prompt counted with both its completions
    seconds: float  # wall time of the call
    last_metrics: dict[str, float] = field(default_factory=dict)  # the last logged record


def cast_for_precision(model: torch.nn.Module, precision: str) -> None:
    """Cast ``model``'s parameters in place to the dtype a resolved ``precision`` trains in
    (``parameter_dtype``), as ``DPOTrainer`` does on construction. LoRA adapters, sdpo's
    (engine/lora.py) or PEFT's (``peft_adapter_parameters``), keep their dtype (fp32) whatever
    the precision, and under bf16 a Hugging Face model's ``_keep_in_fp32_modules_strict`` (a
    MoE router's gate and score-correction bias, ``fp32_kept_tensors``) are fp32, as
    transformers loads them: cast, they trained in bf16 and a step folder stored them rounded.
    A model in another dtype has its floating buffers cast too, as ``Module.to`` casts them
    (not with adapters, nor the kept ones); one already in the precision's dtype keeps them as
    they are (a model transformers loaded in bf16 keeps its rotary's fp32 inverse frequencies).
    The Parameter objects are kept.

    A parameter sharded with FSDP2 (``fully_shard``: a DTensor) is never cast: FSDP keeps its
    padded shard and its gather buffers apart from the Parameter, in the dtype the model was
    sharded in (a bf16 cast left them fp32, and the first update failed on the dtypes). One
    in another dtype than the precision's is refused before anything is cast, naming what to
    do; one already in it trains as it is."""
    wanted = parameter_dtype(precision)
    adapters = {id(p) for p in [*adapter_parameters(model), *peft_adapter_parameters(model)]}
    fp32 = {id(t) for t in fp32_kept_tensors(model, wanted)}
    for name, p in model.named_parameters():
        dtype = torch.float32 if id(p) in fp32 else wanted
        if id(p) not in adapters and p.dtype != dtype and sharding.is_dtensor(p):
            # the precisions that train a model sharded in p.dtype as it is
            keep = {
                torch.float32: "precision 'fp32' or 'bf16-mixed' (fp32 parameters; FSDP's "
                "MixedPrecisionPolicy(param_dtype=torch.bfloat16) gathers them in bf16)",
                torch.bfloat16: "precision 'bf16'",
            }.get(p.dtype)
            if p.dtype == torch.float32 and sharding.policy_precision(model) == "bf16-mixed":
                # its MixedPrecisionPolicy gathers them in bf16: 'fp32' would be refused next
                keep = (
                    "precision 'bf16-mixed' or 'auto' (fp32 parameters, which its FSDP "
                    "MixedPrecisionPolicy gathers in bf16)"
                )
            raise ValueError(
                f"precision {precision!r} trains the parameters in {dtype}, and this model is "
                f"sharded with FSDP2 (fully_shard) in {p.dtype} ({name}, a DTensor): a sharded "
                "parameter cannot be cast in place (FSDP keeps its shards and gather buffers "
                f"in the dtype it was sharded in). Cast the model to {dtype} before fully_shard"
                + (f", or train it with {keep}" if keep else "")
            )
    cast = False
    for p in model.parameters():
        dtype = torch.float32 if id(p) in fp32 else wanted
        if id(p) in adapters or p.dtype == dtype:
            continue
        cast |= id(p) not in fp32
        p.data = p.data.to(dtype)
        if p.grad is not None:  # as Module.to casts it
            p.grad = p.grad.to(dtype)
    if cast and not adapters:
        for module in model.modules():
            for name, b in module._buffers.items():
                if b is not None and b.is_floating_point() and id(b) not in fp32:
                    module._buffers[name] = b.to(wanted)


def check_grad_mode(who: str) -> None:
    """Training needs autograd: under ``torch.no_grad()`` or ``torch.inference_mode()`` the
    first backward fails with PyTorch's "does not require grad" (or an inference-tensor error)
    only after the reference pass has run. Refused up front instead, naming the cause."""
    if torch.is_inference_mode_enabled() or not torch.is_grad_enabled():
        mode = "torch.inference_mode()" if torch.is_inference_mode_enabled() else "torch.no_grad()"
        raise RuntimeError(
            f"{who} trains the model but was called with gradients off (inside {mode}); call it "
            "outside that block"
        )


def check_trainable(model: torch.nn.Module, who: str) -> None:
    """A model with no parameter that requires grad would train nothing: its first backward
    fails with PyTorch's "does not require grad" after the reference pass. Refused up front."""
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            f"{who}: {type(model).__name__} has no trainable parameters (requires_grad is False "
            "on every one); unfreeze the weights to train, or add LoRA adapters"
        )


def check_config_type(value: object, cls: type, name: str, who: str) -> None:
    """A settings object of the right class: a dict or a TRL config (``DPOConfig``,
    ``TrainingArguments``) failed later with an AttributeError on the first field read."""
    if not isinstance(value, cls):
        raise TypeError(
            f"{who}: {name} must be a {cls.__module__}.{cls.__qualname__}, got "
            f"{type(value).__qualname__}: build one, {cls.__qualname__}(field=value, ...)"
        )


def check_reference_table(ref: object, who: str) -> None:
    """The reference values are a ``PairLogps`` (``score_pairs``' result): another table, such
    as the ``sdpo.cache.RefValues`` that ``RefLogprobCache.load`` returns, failed with an
    AttributeError at its first lookup (in run_sdpo after M0's scoring pass). Refused up front,
    with the conversion."""
    if not isinstance(ref, PairLogps):
        hint = (
            ": convert it with .to_pair_logps()"
            if callable(getattr(ref, "to_pair_logps", None))
            else ""
        )
        raise TypeError(
            f"{who} takes the reference values as a PairLogps (score_pairs' result), got "
            f"{type(ref).__qualname__}{hint}"
        )


def check_reference_tokens(ref: PairLogps, pairs: Sequence[TokenizedPair], who: str) -> None:
    """The reference values of ``pairs`` count the completion tokens the pairs hold: values
    scored for other token ids under the same pair indices (a cache of another max_length,
    max_prompt_length, truncation or tokenizer) would give the loss other completions' sums.
    Refused, naming the first such pair; ``ref`` holds every pair (``rows_for`` checked it)."""
    rows = ref.rows_for(torch.tensor([p.index for p in pairs], dtype=torch.int64))
    held = torch.tensor([[len(p.chosen_ids), len(p.rejected_ids)] for p in pairs])
    counted = torch.stack([ref.chosen_tokens[rows], ref.rejected_tokens[rows]], dim=1)
    wrong = (counted.to(held.dtype) != held).any(dim=1).nonzero()
    if wrong.numel() == 0:
        return
    k = int(wrong[0, 0])
    got, has = counted[k].tolist(), held[k].tolist()
    raise ValueError(
        f"{who}: the reference values of pair {pairs[k].index} count {got[0]:g} chosen and "
        f"{got[1]:g} rejected tokens, and the pair has {has[0]} and {has[1]} "
        f"({int(wrong.shape[0])} pair(s) differ): they were scored for other token ids (another "
        "max_length, max_prompt_length, truncation or tokenizer); score the reference on these "
        "pairs"
    )


def _loss_config(loss_fn: PairLossFn) -> Any:
    """The config a loss function is bound to (``partial(dpo_loss, config=...)``), or None."""
    return getattr(loss_fn, "keywords", {}).get("config")


def _check_loss_fn_ld_alpha(loss_fn: PairLossFn, ld_alpha: float | None) -> None:
    """A loss function bound to a config (``partial(dpo_loss, config=...)``) whose ``ld_alpha``
    is not the trainer's: the per-pair loss cannot apply it (it sees summed log-probs), so it
    would be silently ignored. Refused."""
    config = _loss_config(loss_fn)
    wanted = getattr(config, "ld_alpha", None)
    if wanted not in (None, 1) and wanted != ld_alpha:
        raise ValueError(
            f"the loss config has ld_alpha = {wanted} but the trainer was built with ld_alpha = "
            f"{ld_alpha}: LD-DPO weights the tokens in the log-prob head, so pass "
            f"DPOTrainer(..., ld_alpha={wanted}) (and score the reference with "
            f"score_pairs(..., ld_alpha={wanted}))"
        )


def _step_metrics(sums: dict[str, Tensor], pairs: int) -> dict[str, Tensor]:
    """A step's metrics from its summed micro-batch values (every rank's): the per-pair ones
    divided by the step's pairs, the token metrics by their token counts (0 where there are no
    such tokens, as TRL logs it), all on the device."""
    metrics = {
        k: v / pairs for k, v in sums.items() if k not in TOKEN_METRICS and k not in TOKEN_COUNTS
    }
    for key, counts in TOKEN_METRICS.items():
        if key in sums:
            count = sum(sums[c] for c in counts)
            metrics[key] = torch.where(count > 0, sums[key] / count.clamp(min=1.0), 0.0)
    return metrics


class DPOTrainer:
    """Trains ``model`` on ``pairs`` against cached reference values ``ref``.

    ``model`` maps ``(input_ids, position_ids, cu_seqlens, max_seqlen)`` to final hidden states
    and exposes ``lm_head_weight``; ``loss_fn`` is per pair (see ``PairLossFn``)."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        config: TrainConfig,
        loss_fn: PairLossFn,
        kernels_impl: str = "auto",
        chunk_tokens: int | None = None,
        max_chunk_tokens: int | None = None,
        output_dir: str | Path | None = None,
        metrics_extra: dict[str, Any] | None = None,
        save_checkpoint: Callable[[DPOTrainer], None] | None = None,
        progress: bool = True,
        optimizer: torch.optim.Optimizer | None = None,
        stop_requested: Callable[[], bool] | None = None,
        log_hook: Callable[[dict[str, Any]], None] | None = None,
        evaluate: Callable[[DPOTrainer], None] | None = None,
        ld_alpha: float | None = None,
        profiler: StepProfiler | None = None,
        token_metrics: bool = True,
    ) -> None:
        # a DistributedDataParallel wrapper's module: sdpo sums the gradients over ranks itself
        model = distributed.unwrap_data_parallel(model, "DPOTrainer")
        check_packed_model(model, "DPOTrainer")  # before the model is cast or anything built
        check_trainable(model, "DPOTrainer")
        sharding.check_trainable_sharded(model, "DPOTrainer")
        check_config_type(config, TrainConfig, "config", "DPOTrainer")
        if not callable(loss_fn):
            raise TypeError(
                f"DPOTrainer: loss_fn must be a per-pair loss function, got "
                f"{type(loss_fn).__qualname__}; for a loss config pass "
                "functools.partial(sdpo.losses.dpo_loss, config=LossConfig(...))"
            )
        self.model = model
        self.config = config
        self.loss_fn = loss_fn
        # LD-DPO (``loss.ld_alpha``): the policy's summed log-probs weigh each completion's
        # tokens past its pair's shorter length by ld_alpha (engine/packing.py); the reference
        # values must have been scored with the same ld_alpha (``score_pairs``)
        check_ld_alpha(ld_alpha)
        _check_loss_fn_ld_alpha(loss_fn, ld_alpha)
        self.ld_alpha = ld_alpha
        # WPO (``loss.use_weighting`` of a bound loss config): the policy's forward also forms
        # each completion's sum of token_logp - log sum p^2, handed to the loss as
        # chosen_aligned / rejected_aligned (sdpo/losses.py)
        self.use_weighting = bool(getattr(_loss_config(loss_fn), "use_weighting", False))
        # TRL's sft loss type: the mean token NLL of the step's chosen completions; each pair's
        # share needs the step's chosen-token count (train_step), given as sft_scale
        self.sft = "sft" in getattr(_loss_config(loss_fn), "loss_types", ())
        self._sft_scale: float | None = None
        # LD-DPO with a chosen NLL term (sft, rpo_alpha): the head also forms each completion's
        # unweighted sum, which that term reads (chosen_raw, sdpo/losses.py)
        self.raw_logps = bool(getattr(_loss_config(loss_fn), "needs_raw_logps", False))
        self.kernels_impl = kernels_impl
        # TRL's token metrics (TOKEN_METRICS) in every record, summed in the log-prob head's
        # forward; False: the head runs without them (its kernel built without the reductions)
        # and records lack the four keys. The loss and the gradients are the same either way.
        self.token_metrics = bool(token_metrics)
        self._reduced_keys = (
            REDUCED_KEYS
            if self.token_metrics
            else tuple(k for k in REDUCED_KEYS if k not in TOKEN_METRICS)
        )
        # a mixture of experts' router loss (engine/hf.py), weighted by the loss config's
        # router_aux_loss_coef where it sets one (TRL's DPOConfig option; unset: the model
        # config's), logged unweighted as TRL logs it
        apply_router_aux_loss_coef(
            model, getattr(_loss_config(loss_fn), "router_aux_loss_coef", None)
        )
        if getattr(model, "router_aux_loss_coef", 0.0):
            self._reduced_keys += ("aux_loss",)
        # token metrics a resumed log window lacks for some of its steps: left out of its record
        self._window_lacks: set[str] = set()
        # Gemma 2's final_logit_softcapping (PackedCausalLM): the log-probs are those of the
        # capped logits, from a PyTorch head (kernels/softcap_head.py) on the plain loss path,
        # whatever train.loss_path says; the scoring pass takes the same head
        self.logit_softcap = getattr(model, "logit_softcap", None)
        self.chunk_tokens = chunk_tokens
        self.max_chunk_tokens = max_chunk_tokens  # fused path: longer pairs are split
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.metrics_extra = dict(metrics_extra or {})
        self.save_checkpoint = save_checkpoint
        self.stop_requested = stop_requested
        self.log_hook = log_hook  # rank 0: also gets each record written to metrics.jsonl
        # set: records also carry ``run_step`` = this + the step's number in this pass (a
        # stepwise run's x-axis, counting on across its trainers)
        self.run_step_base: int | None = None
        # records' num_tokens (TRL's running count of the input tokens trained on, the prompt
        # counted with each completion) = this + the tokens of this pass so far: a stepwise
        # run sets it to the tokens of its earlier sDPO steps
        self.num_tokens_base = 0
        # the finite steps since the last logged record: a record holds their mean, as TRL's
        # logging_steps do (saved with the training state, so a resumed run logs the same)
        self._log_window: dict[str, Any] = {"steps": 0, "sums": {}}
        # every eval_every optimizer steps but the pass's last, on every rank (scoring may be a
        # collective); its time is left out of tokens_per_s
        self.evaluate = evaluate
        # torch.profiler over a window of this pass's optimizer steps (engine/profiling.py)
        self.profiler = profiler
        self.progress = progress
        self.device = next(model.parameters()).device
        # a model its caller sharded: "auto" is the precision its sharding says, and one its
        # MixedPrecisionPolicy contradicts is refused (sharding.model_precision)
        self.precision = sharding.model_precision(
            config.precision, model, self.device, who="DPOTrainer"
        )
        cast_for_precision(model, self.precision)
        # sharded (FSDP2, engine/sharding.py): gradients are reduce-scattered in the backward,
        # and the optimizer is the foreach one (not the fused grad_scale/found_inf path)
        self.sharded = sharding.is_sharded(model)
        # An optimizer handed in keeps its state (sDPO with reset_optimizer = false).
        if optimizer is None:
            optimizer = build_optimizer(model, config, fused=False if self.sharded else None)
        self.optimizer = optimizer
        # its state is sharded with FSDP's parameters (not a LoRA adapter's: whole on every rank)
        self.sharded_optimizer = any(
            sharding.is_dtensor(p) for group in optimizer.param_groups for p in group["params"]
        )
        self.global_step = 0
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        # where fit() stands: the next step to run is plans[epoch][step_in_epoch]
        self.position = {"epoch": 0, "step_in_epoch": 0, "step_in_run": 0, "tokens": 0}
        self.skipped_steps = 0
        self._last_finite: Tensor | bool = True  # the last step's flag: on the device, or read
        # inside fit (fused AdamW): non-finite steps so far, on the device (see the module doc)
        self._nonfinite_on_device: Tensor | None = None
        self._stop_seen = False  # data parallel: a stop agreed in a step whose values were read
        # where a stop asked for now takes effect (stop_takes_effect_after): the pass's step
        # under way, or the last one done (the first to come before any); data parallel, the
        # last step whose all-reduce read stop_requested, and whether the loop reads a step's
        # values only once the next is queued (fused AdamW)
        self.step_begun = 1
        self._stop_read_in = 0
        self._values_deferred = False
        self._pass_steps: int | None = None
        self.data_parallel = distributed.active()
        # a mixture of experts' router loss (engine/hf.py) is computed over a micro-batch's
        # tokens, not summed over its pairs: data parallel, the plan's micro-batches are never
        # split over ranks, so that the ranks' sum is one process's loss (shard_micro_batches)
        self.whole_micro_batches = bool(getattr(model, "router_aux_loss_coef", 0.0))
        self.memory_probe_result: dict[str, Any] | None = None
        self._stop_agreed: Tensor | None = None  # data parallel: the ranks' summed stop flags
        # data parallel: the summed stop flags of the last two steps' all-reduces, by the
        # pass's step: a stop another rank asked for first may be agreed in them already
        # (stop_takes_effect_after reads them, once, when a stop is asked for here)
        self._stops_agreed: dict[int, Tensor] = {}
        # the list of pairs whose token ids were checked last (by fit, or by train_step on
        # first sight), and the reference table checked to hold them: train_step walks a list
        # once, not at every step
        self._ids_checked: Sequence[TokenizedPair] | None = None
        self._ref_checked: PairLogps | None = None
        # data parallel, unsharded: gradients reduced in buckets during the last backward.
        # Sharded, the replicated parameters (a LoRA adapter) are reduced in one all-reduce after
        # the last pass: all-reduces started inside a backward would interleave with FSDP's
        # gathers in a different order on a rank whose last pass comes earlier (a deadlock)
        self.grad_reducer = (
            distributed.GradReducer(model.parameters())
            if self.data_parallel and not self.sharded and config.overlap_grad_reduce
            else None
        )

    def _summed_gradients(self) -> contextlib.AbstractContextManager:
        """Sharded: FSDP sums the gradients over ranks in this block's backward passes, as the
        loss's division by the global pair count needs (a model the caller sharded averages
        them otherwise); its own setting comes back after it."""
        if not self.sharded:
            return contextlib.nullcontext()
        return sharding.summed_gradients(self.model)

    def _replicated_parameters(self) -> list[Tensor]:
        """The trainable parameters whole on every rank (not FSDP's DTensors): their gradients
        are summed over ranks by the trainer, not by FSDP."""
        return [
            p for p in self.model.parameters() if p.requires_grad and not sharding.is_dtensor(p)
        ]

    # -- one optimizer step -------------------------------------------------------------
    def _micro_batch(
        self,
        pairs: Sequence[TokenizedPair],
        positions: list[int],
        ref: PairLogps,
        normalizer: int,
        weight_of_loss: float = 1.0,
    ) -> dict[str, Tensor]:
        """Forward and backward of one micro-batch; returns detached metric sums.
        ``weight_of_loss`` 0: a filler pass that adds nothing to the gradients (sharded
        training: every rank must run as many passes as the busiest one)."""
        share = self.config.share_prompt
        chunk = [pairs[i] for i in positions]
        host_batch = pack_pairs_shared(chunk) if share else pack_pairs(chunk)  # CPU tensors
        rows = ref.rows_for(host_batch.pair_indices)  # looked up on the host: no device sync
        # the rows with a label (and their LD-DPO weights), counted on the host
        host_head = head_rows(host_batch, ld_alpha=self.ld_alpha)
        batch = to_device(host_batch, self.device)
        head = to_device(host_head, self.device)
        ref_c = to_device(ref.chosen_logps[rows], self.device)
        ref_r = to_device(ref.rejected_logps[rows], self.device)
        tok_c = batch.completion_tokens[0::2]
        tok_r = batch.completion_tokens[1::2]
        # shared_prefix only with shared prompts: a model without them need not take it
        shared = {"shared_prefix": batch.shared_prefix} if share else {}
        with autocast_context(self.precision, self.device):
            hidden = self.model(
                batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen, **shared
            )  # (N, H), N = sum(P + C + R) with shared prompts
        hidden = hidden.index_select(0, head.index)  # (M, H): only rows with a label
        hidden, weight = head_inputs(
            hidden, sharding.gathered_head_weight(self.model), self.precision
        )

        wpo, with_raw = self.use_weighting, self.raw_logps
        # the step's (pairs / chosen tokens) for the sft type; None: this batch's own
        sft = {"sft_scale": self._sft_scale} if self.sft else {}
        # a soft-capped model (logit_softcap) takes the plain path with its own head
        fused = self.config.loss_path == "fused" and self.logit_softcap is None
        if fused:

            def pair_loss(chosen: Tensor, rejected: Tensor, sl: slice, **chunk_sums) -> Tensor:
                chunk_sums.pop("rejected_raw", None)  # no loss term reads it
                out = self.loss_fn(
                    chosen,
                    rejected,
                    ref_c[sl],
                    ref_r[sl],
                    chosen_tokens=tok_c[sl],
                    rejected_tokens=tok_r[sl],
                    # WPO: chosen_aligned / rejected_aligned; LD-DPO's chosen_raw
                    **chunk_sums,
                    **sft,
                )
                return out.losses.sum() * weight_of_loss / normalizer

            loss, seq_logps, *rest = linear_pair_loss(
                hidden,
                weight,
                head.labels,
                head.seq_ids,
                batch.num_seqs,
                pair_loss=pair_loss,
                impl=self.kernels_impl,
                chunk_tokens=self.chunk_tokens,
                max_chunk_tokens=self.max_chunk_tokens,
                pair_tokens=host_head.pair_tokens,  # the host's counts: no device sync
                token_weights=head.token_weights,
                with_aligned=wpo,
                with_raw=with_raw,
                with_stats=self.token_metrics,  # the token metrics, from the same pass
            )
            stats = rest.pop() if self.token_metrics else None
            seq_aligned, seq_raw = rest[:1] if wpo else [], rest[-1] if with_raw else None
        else:
            head_sums = partial(
                logprob_head(self.model),
                hidden,
                weight,
                head.labels,
                head.seq_ids,
                batch.num_seqs,
                impl=self.kernels_impl,
                chunk_tokens=self.chunk_tokens,
            )
            logps = head_sums(
                token_weights=head.token_weights,
                return_aligned=wpo,
                return_stats=self.token_metrics,
            )
            logps = list(logps) if wpo or self.token_metrics else [logps]
            stats = logps.pop() if self.token_metrics else None
            seq_logps, *seq_aligned = logps
            # the unweighted sums: the same head once more, without token weights
            seq_raw = head_sums() if with_raw else None
        # WPO's sums of the whole micro-batch (the plain path's loss and the metrics need them)
        aligned = (
            {"chosen_aligned": seq_aligned[0][0::2], "rejected_aligned": seq_aligned[0][1::2]}
            if seq_aligned
            else {}
        )
        raw = {"chosen_raw": seq_raw[0::2]} if seq_raw is not None else {}
        if not fused:
            out = self.loss_fn(
                seq_logps[0::2],
                seq_logps[1::2],
                ref_c,
                ref_r,
                chosen_tokens=tok_c,
                rejected_tokens=tok_r,
                **aligned,
                **raw,
                **sft,
            )
            loss = out.losses.sum() * weight_of_loss / normalizer
        aux = self.model.pop_aux_loss() if hasattr(self.model, "pop_aux_loss") else None
        if aux is not None:
            # a mixture of experts' router load-balancing loss (engine/hf.py), once per
            # micro-batch as TRL adds it per batch, weighted by the micro-batch's pairs
            coef = self.model.router_aux_loss_coef
            loss = loss + aux * (coef * len(chunk) * weight_of_loss / normalizer)
        loss.backward()
        fault_point("micro_batch")

        with torch.no_grad():
            pc, pr = seq_logps.detach()[0::2].float(), seq_logps.detach()[1::2].float()
            tokens = batch.completion_tokens.float()  # (S,) the scored rows of each sequence
            raw = {k: v.detach() for k, v in raw.items()}
            out = self.loss_fn(
                pc,
                pr,
                ref_c,
                ref_r,
                chosen_tokens=tok_c,
                rejected_tokens=tok_r,
                **aligned,
                **raw,
                **sft,
            )
            sums = {
                "loss": loss.detach().float() * normalizer,
                "rewards/chosen": out.chosen_rewards.sum(),
                "rewards/rejected": out.rejected_rewards.sum(),
                "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).float().sum(),
                "rewards/margins": (out.chosen_rewards - out.rejected_rewards).sum(),
                "logps/chosen": pc.sum(),
                "logps/rejected": pr.sum(),
                "tokens/chosen": tokens[0::2].sum(),
                "tokens/rejected": tokens[1::2].sum(),
            }
            if aux is not None:  # TRL's aux_loss: each batch's router loss, here pair-weighted
                sums["aux_loss"] = aux.detach().float() * len(chunk)
            if stats is not None:  # the token metrics' sums over the completion tokens
                sums["entropy"] = stats[:, 0].sum()  # (STAT_NAMES)
                sums["logits/chosen"] = stats[0::2, 1].sum()
                sums["logits/rejected"] = stats[1::2, 1].sum()
                sums["mean_token_accuracy"] = stats[0::2, 2].sum()
            return sums

    def _local_share(
        self,
        pairs: Sequence[TokenizedPair],
        micro_batches: list[list[int]],
        *,
        rank: int | None = None,
    ) -> list[list[int]]:
        """The micro-batches of one step that ``rank`` (default: this rank) runs."""
        if not self.data_parallel:
            return micro_batches
        return shard_micro_batches(
            pairs,
            micro_batches,
            world_size=distributed.world(),
            rank=distributed.rank() if rank is None else rank,
            max_tokens=self.config.max_tokens_per_batch,
            whole_micro_batches=self.whole_micro_batches,
        )

    def train_step(
        self, pairs: Sequence[TokenizedPair], micro_batches: list[list[int]], ref: PairLogps
    ) -> dict[str, Tensor]:
        """One optimizer step over ``micro_batches``; metric values stay on the device.

        Data parallel: ``micro_batches`` is the whole step (the same on every rank); this rank
        runs its share and the gradients and metric sums are summed over ranks.

        The pairs (``check_pairs``), their token ids (``check_token_ids``), that each can be
        packed (a prompt and both completions) and that ``ref`` holds each one's values for its
        tokens (``check_reference_tokens``) are checked the first time a list, or a table, is
        given, as ``fit`` checks its pairs once; a list changed afterwards is not checked again.
        Unchecked, a bad pair met by a later micro-batch would leave the earlier ones' gradients
        behind, an id outside the vocabulary would fail in the embedding lookup (an opaque
        index error; a device-side assert on a GPU), and, data parallel, the one rank whose
        share holds it would fail while the others wait in the all-reduce; every rank checks
        the whole list, so every rank refuses it."""
        if pairs is not self._ids_checked:
            check_pairs(pairs, "DPOTrainer.train_step")
            self._check_ids(pairs)
            self._ids_checked, self._ref_checked = pairs, None
        if ref is not self._ref_checked:
            check_reference_table(ref, "DPOTrainer.train_step")
            check_reference_tokens(ref, pairs, "DPOTrainer.train_step")
            self._ref_checked = ref
        normalizer = sum(len(m) for m in micro_batches)
        if self.sft:  # the whole step's pairs over its chosen completion tokens (every rank's)
            chosen = sum(len(pairs[i].chosen_ids) for m in micro_batches for i in m)
            self._sft_scale = normalizer / max(chosen, 1)
        self.optimizer.zero_grad(set_to_none=True)
        if self.sharded:
            # the parameter gathers are collectives, so every rank runs as many forward/backward
            # passes as the busiest rank (the others add zero-weighted ones)
            shares = [
                self._local_share(pairs, micro_batches, rank=r) for r in range(distributed.world())
            ]
            local, passes = shares[distributed.rank()], max(len(s) for s in shares)
        else:
            local = self._local_share(pairs, micro_batches)
            passes = len(local)
        sums: dict[str, Tensor] = {}
        reducer = self.grad_reducer
        with self._summed_gradients():
            for j, positions in enumerate(local):
                if reducer is not None and j == len(local) - 1:
                    reducer.begin()  # this backward starts the gradients' all-reduce
                part = self._micro_batch(pairs, positions, ref, normalizer)
                for k, v in part.items():
                    sums[k] = sums[k] + v if k in sums else v
            for _ in range(passes - len(local)):
                self._micro_batch(pairs, micro_batches[0][:1], ref, normalizer, weight_of_loss=0.0)
        if reducer is not None:
            reducer.finish()  # also on a rank without micro-batches: it sends zeros
        if self.data_parallel:
            sums = self._reduce_over_ranks(sums, grads=reducer is None)
        metrics = _step_metrics(sums, normalizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        # sharded gradients (DTensors): the norm of the local shards is combined over ranks
        norm = sharding.full_tensor(torch.nn.utils.get_total_norm([p.grad for p in params]))
        metrics["grad_norm"] = norm
        finite = torch.isfinite(metrics["loss"]) & torch.isfinite(norm)
        if _takes_grad_scale(self.optimizer) and not self.sharded:
            # Fused AdamW reads two device tensors: grads are divided by ``grad_scale`` inside
            # its kernel (the clipping costs no pass over the gradients of its own) and a
            # nonzero ``found_inf`` makes the whole update a no-op, step counters included.
            # The host never waits for ``finite`` here (``last_step_finite`` reads it).
            if self.config.max_grad_norm:
                # fp32 whatever the gradients' dtype: the kernel reads a float (the norm of
                # bf16 gradients comes back in bf16)
                scale = ((norm.float() + 1e-6) / self.config.max_grad_norm).clamp(min=1.0)
                self.optimizer.grad_scale = torch.where(finite, scale, 1.0)
            blocked = ~finite
            if self._nonfinite_on_device is not None:  # inside fit: the skip budget, counted
                self._nonfinite_on_device += blocked
                budget = self.config.skip_nonfinite_batches
                blocked = blocked | (self._nonfinite_on_device > budget)
            self.optimizer.found_inf = blocked.float()
            try:
                self.optimizer.step()
            finally:
                self.optimizer.grad_scale = self.optimizer.found_inf = None
            self._last_finite = finite
            return metrics
        if self.config.max_grad_norm:
            torch.nn.utils.clip_grads_with_norm_(params, self.config.max_grad_norm, norm)
        # the one host read of the step: a NaN/inf update must never reach the weights
        self._last_finite = bool(finite)
        if self._last_finite:
            self.optimizer.step()
        else:
            self.optimizer.zero_grad(set_to_none=True)
        return metrics

    @property
    def last_step_finite(self) -> bool:
        """Whether the last ``train_step``'s loss and gradient norm were finite (its update
        applied). With fused AdamW the flag stays on the device until this is read, which
        waits for the step to finish."""
        if isinstance(self._last_finite, Tensor):
            self._last_finite = bool(self._last_finite)
        return self._last_finite

    def probe_memory(
        self, pairs: Sequence[TokenizedPair], ref: PairLogps, micro_batches: list[list[int]]
    ) -> dict[str, Any]:
        """Forward and backward of the largest of ``micro_batches`` (by tokens) with the loss
        weighted 0, with AdamW's states present as they are from the first optimizer step on
        (made for the probe where the optimizer has none yet, see
        :func:`create_optimizer_states`, and removed after it); then the gradients are dropped
        and every RNG state restored: training goes on exactly as without the probe, from a
        fresh optimizer's state if it had one. Every rank probes (sharded models gather and
        scatter in it). Returns (and rank 0 prints) the batch's size, the optimizer states'
        bytes on this rank and, on CUDA, the peak memory, states included. The batch's token
        ids are checked first, unless ``pairs`` were (see ``train_step``)."""
        largest = max(micro_batches, key=lambda b: (sum(pairs[i].num_tokens for i in b), len(b)))
        if pairs is not self._ids_checked:
            self._check_ids([pairs[i] for i in largest])
        tokens = sum(pairs[i].num_tokens for i in largest)
        rng = _rng_state()
        on_cuda = self.device.type == "cuda"
        created: list[Tensor] = []
        try:
            created = create_optimizer_states(self.optimizer)
            state_bytes = optimizer_state_bytes(self.optimizer)
            if on_cuda:
                torch.cuda.synchronize(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
            with self._summed_gradients():
                self._micro_batch(pairs, largest, ref, len(largest), weight_of_loss=0.0)
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            for p in created:  # a fresh optimizer's state again: none, no step counted
                del self.optimizer.state[p]
            _set_rng_state(rng)
        result: dict[str, Any] = {
            "tokens": tokens,
            "pairs": len(largest),
            "optimizer_state_bytes": state_bytes,
        }
        line = f"memory probe: the largest micro-batch ({len(largest)} pairs, {tokens} tokens) fits"
        if on_cuda:
            peak = torch.cuda.max_memory_allocated(self.device) / 2**30
            total = torch.cuda.get_device_properties(self.device).total_memory / 2**30
            result.update(peak_gib=peak, total_gib=total)
            line += (
                f", peak {peak:.2f} of {total:.1f} GiB with the optimizer's states "
                f"({state_bytes / 2**30:.2f} GiB)"
            )
        self.memory_probe_result = result
        if distributed.is_main():
            print(f"[sdpo] {line}", flush=True)
        return result

    def _check_ids(self, pairs: Sequence[TokenizedPair]) -> None:
        """Every token id of ``pairs`` an int in the model's vocabulary and every pair with a
        prompt and both completions, named if not."""
        check_token_ids(pairs, vocab_size=self.model.lm_head_weight.shape[0])
        check_packable(pairs)

    def _reduce_over_ranks(self, sums: dict[str, Tensor], *, grads: bool) -> dict[str, Tensor]:
        """Sum the metric sums, the stop flags and, with ``grads``, the gradients of the
        replicated parameters over ranks (in place; fp32 gradients and the metric vector share
        one flat buffer). A parameter that got no gradient on this rank (no micro-batch, or an
        expert no token was routed to) contributes zeros; one that got none on any rank is left
        without a gradient, as in one process (AdamW then leaves it and its state alone).
        Without ``grads`` (overlapped) they have been reduced already; FSDP's sharded
        parameters are reduce-scattered in the backward."""
        replicated = self._replicated_parameters()
        # the replicated parameters without a gradient on this rank (the overlapped reduction
        # has filled in their zeros already and says which)
        if grads:
            missing = [i for i, p in enumerate(replicated) if p.grad is None]
            for i in missing:
                replicated[i].grad = torch.zeros_like(replicated[i])
        else:
            filled = self.grad_reducer.zero_filled
            missing = [i for i, p in enumerate(replicated) if id(p) in filled]
        params = replicated if grads else []
        stop = bool(self.stop_requested()) if self.stop_requested is not None else False
        self._stop_read_in = self.step_begun
        keys = len(self._reduced_keys)
        # after the sums and the stop flag: per replicated parameter, the ranks without its
        # gradient (filled on the device, see below)
        absent = torch.zeros(len(replicated), device=self.device)
        for i in missing:
            absent[i] = 1.0
        vector = torch.cat(
            [
                torch.stack(
                    [
                        sums[k].float() if k in sums else torch.zeros((), device=self.device)
                        for k in self._reduced_keys
                    ]
                    # filled on the device: torch.tensor(value, device=...) would copy from
                    # pageable memory, which waits for the device's queued work (the backward)
                    + [torch.full((), float(stop), device=self.device)]
                ),
                absent,
            ]
        )
        distributed.all_reduce_sum([*(p.grad for p in params), vector])
        self._stop_agreed = vector[keys]
        agreed = self._stops_agreed
        agreed[self.step_begun] = self._stop_agreed
        if len(agreed) > 2:  # older steps' values have been read (a stop in one: acted on)
            del agreed[min(agreed)]
        if missing:
            # only a rank that lacks a gradient reads which no rank has (a host read; none in
            # the usual step, where every rank has every gradient and so none can lack it)
            counts = vector[keys + 1 :][missing].tolist()
            for i, count in zip(missing, counts, strict=True):
                if count == distributed.world():
                    replicated[i].grad = None
        return {k: vector[i] for i, k in enumerate(self._reduced_keys)}

    def stop_takes_effect_after(self) -> int:
        """The step of this pass (``position["step_in_run"]``) after which a graceful stop asked
        for now on this rank ends it, the pass's last at most: the step under way (or the last
        one done, or the first to come). Data parallel, the ranks learn of a stop in the
        all-reduce of a step (``_reduce_over_ranks``), the next one when the step under way has
        had its own, and act on it once the loop reads that step's values: at once, or with
        fused AdamW once the step after it is queued (unless an eval or a save is due after it,
        or it is the last). A stop asked for on another rank first may have been agreed in an
        all-reduce this rank has done, its values not yet read: then the stop follows that
        step. This reads the flags of those (at most two) all-reduces, with no collective: on
        a GPU it waits once for the work queued so far."""
        step = self.step_begun
        if self.data_parallel:
            agreed = self._agreed_stop_step()
            if agreed is not None:
                step = agreed
            elif self._stop_read_in >= step:
                step += 1
            if self._values_deferred and step != self._pass_steps and not any(self._due(step)):
                step += 1
        return step if self._pass_steps is None else min(step, self._pass_steps)

    def _agreed_stop_step(self) -> int | None:
        """The earliest of the last two steps whose all-reduce carried a stop from any rank, or
        None. A stop seen in an earlier step's values has ended the loop already."""
        for step, flag in sorted(self._stops_agreed.items()):
            if float(flag) > 0:
                return step
        return None

    def _due(self, step_in_run: int) -> tuple[bool, bool]:
        """Whether an eval pass (``train.eval_every``) and a checkpoint (``train.save_every``)
        follow step ``step_in_run`` of the pass."""
        cfg = self.config
        return (
            bool(cfg.eval_every and self.evaluate and step_in_run % cfg.eval_every == 0),
            bool(cfg.save_every and self.save_checkpoint and step_in_run % cfg.save_every == 0),
        )

    def _should_stop(self) -> bool:
        """A graceful stop was asked for (data parallel: on any rank, agreed in the all-reduce
        of a step whose values the loop has read, so every rank stops after the same step)."""
        if self.data_parallel:
            return self._stop_seen
        return self.stop_requested is not None and bool(self.stop_requested())

    def _step_record(
        self,
        metrics: dict[str, Tensor],
        micro_batches: list[list[int]],
        pairs: Sequence[TokenizedPair],
        **fields: Any,
    ) -> _StepRecord:
        """The step just queued: its metric values, finite flag and (data parallel) agreed
        stop flag start their way to the host."""
        values = dict(metrics)
        finite = self._last_finite
        if not isinstance(finite, Tensor):  # read in the step already
            finite = torch.full((), float(finite), device=metrics["loss"].device)
        values["finite"] = finite
        if self.data_parallel and self._stop_agreed is not None:
            values["stop"] = self._stop_agreed
        return _StepRecord(
            values=_HostValues(values),
            pair_indices=[pairs[i].index for batch in micro_batches for i in batch],
            **fields,
        )

    # -- the loop -----------------------------------------------------------------------
    def fit(
        self,
        pairs: Sequence[TokenizedPair],
        ref: PairLogps,
        *,
        schedule_steps: int | None = None,
        schedule_offset: int = 0,
        resume_state: dict[str, Any] | None = None,
    ) -> TrainResult:
        """Train one pass of ``config.epochs`` over ``pairs``.

        The LR schedule spans this call's steps, unless ``schedule_steps`` (total) and
        ``schedule_offset`` (steps already done) place it inside a longer schedule.
        ``resume_state`` (a ``state_dict`` saved inside an earlier call with the same pairs and
        config) continues that call where it stopped; the model must hold the weights saved
        with it."""
        if not pairs:
            raise ValueError("DPOTrainer.fit needs at least one pair")
        check_grad_mode("DPOTrainer.fit")
        check_pairs(pairs, "DPOTrainer.fit")
        # bad input before any update, not at the micro-batch that holds it
        self._check_ids(pairs)
        check_reference_table(ref, "DPOTrainer.fit")
        check_reference_tokens(ref, pairs, "DPOTrainer.fit")  # every pair in ref, its counts
        # train_step and probe_memory need not walk them again
        self._ids_checked, self._ref_checked = pairs, ref
        cfg = self.config
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        plans = [plan_steps(pairs, cfg, epoch=e) for e in range(cfg.epochs)]
        total_steps = sum(len(p) for p in plans)
        schedule_total = schedule_steps if schedule_steps is not None else total_steps
        if cfg.warmup_steps is not None:  # over the whole schedule, as the ratio is
            warmup = cfg.warmup_steps  # not capped: a longer warm-up never peaks, as in TRL
            if warmup > schedule_total and schedule_offset == 0 and distributed.is_main():
                print(
                    f"[sdpo] train.warmup_steps = {warmup} is longer than the schedule's "
                    f"{schedule_total} optimizer steps: the rate rises to "
                    f"{schedule_total / warmup:.2g} x train.learning_rate and never decays",
                    flush=True,
                )
        else:
            warmup = int(math.ceil(cfg.warmup_ratio * schedule_total))
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] = cfg.learning_rate
        self.scheduler = scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_multiplier(
                s + schedule_offset,
                total_steps=schedule_total,
                warmup_steps=warmup,
                schedule=cfg.schedule,
            ),
        )
        self.position = {"epoch": 0, "step_in_epoch": 0, "step_in_run": 0, "tokens": 0}
        self.skipped_steps = 0
        self._stop_seen = False
        self._stops_agreed = {}
        self._log_window = {"steps": 0, "sums": {}}
        if resume_state is not None:
            self.load_state_dict(resume_state)
        pos = self.position
        # no step of the pass begun yet: a stop asked for now follows the first
        self.step_begun, self._stop_read_in = pos["step_in_run"] + 1, pos["step_in_run"]
        self._values_deferred = _takes_grad_scale(self.optimizer) and not self.sharded
        self._pass_steps = total_steps
        self.model.train()
        probe = cfg.memory_probe if cfg.memory_probe is not None else self.device.type == "cuda"
        if probe:
            local = [b for plan in plans for step in plan for b in self._local_share(pairs, step)]
            self.probe_memory(pairs, ref, local or [plans[0][0][0][:1]])
        bar = None
        if self.progress and distributed.is_main():
            from tqdm.auto import tqdm

            bar = tqdm(
                total=total_steps,
                initial=pos["step_in_run"],
                desc="train",
                unit="step",
                dynamic_ncols=True,
            )
        start = time.perf_counter()
        window_start, window_tokens = start, 0
        last: dict[str, float] = {}
        if self.profiler is not None and self.profiler.first > total_steps:
            self.profiler.log(
                f"profile: this pass has {total_steps} optimizer steps, so the window from step "
                f"{self.profiler.first} (profile.start_step) traces nothing"
            )
        elif self.profiler is not None and self.profiler.last > total_steps:
            # a window that would end past the pass is cut at its last step, and written
            self.profiler.log(
                f"profile: this pass has {total_steps} optimizer steps, so the window of steps "
                f"{self.profiler.first}-{self.profiler.last} traces steps "
                f"{self.profiler.first}-{total_steps}"
            )
            self.profiler.last = total_steps

        def settle(record: _StepRecord) -> None:
            """Read a queued step's values: skip or stop on a non-finite one, log it."""
            nonlocal window_start, window_tokens, last
            values = record.values.read()
            finite = values.pop("finite") > 0
            self._stop_seen = self._stop_seen or values.pop("stop", 0.0) > 0
            window_tokens += record.tokens
            window = self._log_window
            if not finite:
                self._skip_or_raise(record, values)
                # skipped: nothing to add; the pass's last step still logs its window's steps
                if record.step_in_run != total_steps or not window["steps"]:
                    return
            else:
                window["steps"] += 1
                for k, v in values.items():
                    # the gradient norm is the last finite step's (as TRL logs it), the rest
                    # summed for the window's mean
                    window["sums"][k] = v if k == "grad_norm" else window["sums"].get(k, 0.0) + v
            if record.logging:
                now = time.perf_counter()
                steps, sums = window["steps"], window["sums"]
                self._log_window = {"steps": 0, "sums": {}}
                values = {
                    k: (v if k == "grad_norm" else v / steps)
                    for k, v in sums.items()
                    if k not in self._window_lacks
                }
                self._window_lacks = set()
                if self.run_step_base is not None:
                    values["run_step"] = self.run_step_base + record.step_in_run
                values.update(
                    {
                        "step": record.global_step,
                        # as TRL logs it: the epochs done, a fraction (1.0 ends the first)
                        "epoch": record.epoch + record.step_in_epoch / record.epoch_steps,
                        "lr": record.lr,  # as TRL logs it: the step's own rate
                        "tokens": record.tokens_so_far,
                        "num_tokens": self.num_tokens_base + record.tokens_so_far,
                        "tokens_per_s": window_tokens / max(now - window_start, 1e-9),
                        "skipped_batches": self.skipped_steps,
                        **self.metrics_extra,
                    }
                )
                window_start, window_tokens = now, 0
                last = values
                if self.output_dir is not None and distributed.is_main():
                    append_jsonl(self.output_dir / "metrics.jsonl", values)
                if self.log_hook is not None and distributed.is_main():
                    self.log_hook(values)
                if bar is not None:
                    bar.set_postfix(
                        loss=f"{values['loss']:.4f}",
                        acc=f"{values['rewards/accuracies']:.2f}",
                        tok_s=f"{values['tokens_per_s']:.0f}",
                    )

        deferred = self._values_deferred
        if deferred:
            self._nonfinite_on_device = torch.full(
                (), self.skipped_steps, dtype=torch.int32, device=self.device
            )
        pending: _StepRecord | None = None  # the step queued last, its values not yet read
        try:
            while pos["epoch"] < cfg.epochs:
                epoch, plan = pos["epoch"], plans[pos["epoch"]]
                while pos["step_in_epoch"] < len(plan):
                    micro_batches = plan[pos["step_in_epoch"]]
                    if self.profiler is not None:
                        self.profiler.step_begin(pos["step_in_run"] + 1)
                    step_lr = scheduler.get_last_lr()[0]  # the rate this step runs at
                    self.step_begun = pos["step_in_run"] + 1
                    metrics = self.train_step(pairs, micro_batches, ref)
                    scheduler.step()
                    if self.profiler is not None:
                        self.profiler.step_end(pos["step_in_run"] + 1)
                    step_tokens = sum(pairs[i].num_tokens for batch in micro_batches for i in batch)
                    pos["step_in_epoch"] += 1
                    pos["step_in_run"] += 1
                    pos["tokens"] += step_tokens
                    self.global_step += 1
                    step_in_run = pos["step_in_run"]
                    record = self._step_record(
                        metrics,
                        micro_batches,
                        pairs,
                        epoch=epoch,
                        step_in_epoch=pos["step_in_epoch"],
                        epoch_steps=len(plan),
                        global_step=self.global_step,
                        lr=step_lr,
                        tokens=step_tokens,
                        tokens_so_far=pos["tokens"],
                        step_in_run=step_in_run,
                        logging=step_in_run % cfg.log_every == 0 or step_in_run == total_steps,
                    )
                    if pending is not None:
                        settle(pending)  # the step before: done, or nearly, on the device
                    pending = record
                    eval_due, save_due = self._due(step_in_run)
                    if not deferred or step_in_run == total_steps or eval_due or save_due:
                        settle(pending)
                        pending = None
                    if bar is not None:
                        bar.update(1)
                    fault_point("train_step")
                    if step_in_run == total_steps:
                        break  # the caller saves the end of this pass
                    if eval_due:  # its time is left out of the window's tokens_per_s
                        eval_start = time.perf_counter()
                        self.evaluate(self)
                        window_start += time.perf_counter() - eval_start
                    if save_due:
                        self.save_checkpoint(self)
                    if self._should_stop():
                        if pending is not None:
                            settle(pending)
                            pending = None
                        if not save_due and self.save_checkpoint is not None:
                            self.save_checkpoint(self)
                        if bar is not None:
                            bar.close()
                        raise TrainingStopped(self.global_step)
                pos["epoch"], pos["step_in_epoch"] = pos["epoch"] + 1, 0
        finally:
            self._nonfinite_on_device = None
            if self.profiler is not None:
                self.profiler.close()  # a window left early (error, stop): nothing written
        if bar is not None:
            bar.close()
        # the last step's gradients are spent: freed, so they hold no memory after the pass and
        # never add into a caller's next backward
        self.model.zero_grad(set_to_none=True)
        return TrainResult(
            optimizer_steps=pos["step_in_run"],
            tokens=pos["tokens"],
            seconds=time.perf_counter() - start,
            last_metrics=last,
        )

    def _skip_or_raise(self, record: _StepRecord, values: dict[str, float]) -> None:
        """A step whose loss or gradient was not finite (its update was not applied)."""
        indices = record.pair_indices
        sdpo_step = self.metrics_extra.get("sdpo_step")
        where = (
            (f"sDPO step {sdpo_step}, " if sdpo_step is not None else "")
            + f"optimizer step {record.global_step} (epoch {record.epoch + 1}, step "
            f"{record.step_in_epoch} of the epoch), pairs {indices[:8]}"
            + (" ..." if len(indices) > 8 else "")
        )
        loss_and_norm = f"loss {values['loss']}, grad norm {values['grad_norm']}"
        self.skipped_steps += 1
        if self.skipped_steps > self.config.skip_nonfinite_batches:
            raise NonFiniteError(
                f"non-finite loss or gradient ({loss_and_norm}) at {where}; the update was not "
                "applied and any checkpoint already written is intact. Hint: lower "
                "train.learning_rate, try train.precision = 'fp32' (bf16 overflow), check these "
                "pairs' data and reference values, or set train.skip_nonfinite_batches = N to "
                f"skip up to N such steps (skipped so far: {self.skipped_steps - 1})",
                pair_indices=indices,
            )
        if distributed.is_main():
            print(
                f"[sdpo] skipping a non-finite step ({loss_and_norm}) at {where}: "
                f"{self.skipped_steps} of at most {self.config.skip_nonfinite_batches}",
                flush=True,
            )

    def state_dict(self) -> dict[str, Any]:
        """Training state beside the weights: optimizer, LR schedule, step counters, position
        in the step plan and RNG states. Loadable with ``torch.load(weights_only=True)``.
        Sharded: a collective (every rank calls it); the whole optimizer state is gathered onto
        rank 0 in the plain form (``sharding.full_optimizer_state_dict``: {} on the other
        ranks), so a sharded run's checkpoint is a plain run's; its tensors are copies. A LoRA
        adapter's state is whole on every rank already: the plain form, as is. The plain form
        holds the optimizer's own tensors, as ``torch.optim.Optimizer.state_dict`` does (a copy
        would take their memory again, on the device): write it, or copy it, before the next
        step, which changes them in place."""
        if self.sharded_optimizer:
            optimizer = sharding.full_optimizer_state_dict(self.model, self.optimizer)
        else:
            optimizer = self.optimizer.state_dict()
        return {
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "global_step": self.global_step,
            "position": dict(self.position),
            "skipped_steps": self.skipped_steps,
            "log_window": {
                "steps": self._log_window["steps"],
                "sums": dict(self._log_window["sums"]),
            },
            "rng": _rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict`` (inside ``fit``, after the schedule is built). Sharded: a
        collective; rank 0's optimizer state is broadcast and every rank keeps its shard (the
        other ranks' is not read: each may load the ``state_dict`` it saved, whose optimizer
        state is {} there)."""
        if self.sharded_optimizer:
            sharding.load_full_optimizer_state_dict(self.model, self.optimizer, state["optimizer"])
        elif not state["optimizer"]:
            raise ValueError(
                "this training state has no optimizer state to restore (a sharded run's state "
                "of a rank other than 0, or one written by an older sharded run, train.fsdp = "
                "true): load rank 0's state, or start that run again"
            )
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.global_step = int(state["global_step"])
        self.position = {k: int(v) for k, v in state["position"].items()}
        self.skipped_steps = int(state["skipped_steps"])
        # absent in states saved before records were means: the window starts afresh
        window = state.get("log_window") or {"steps": 0, "sums": {}}
        self._log_window = {"steps": int(window["steps"]), "sums": dict(window["sums"])}
        # a window saved with the token metrics off (``token_metrics``) and resumed with them
        # on: its record leaves them out, as they would not cover its earlier steps; the other
        # way round, its sums of them are dropped
        sums = self._log_window["sums"]
        if not self.token_metrics:
            for k in TOKEN_METRICS:
                sums.pop(k, None)
        elif self._log_window["steps"] and not all(k in sums for k in TOKEN_METRICS):
            self._window_lacks = set(TOKEN_METRICS)
        _set_rng_state(state["rng"])

    def save_state(self, path: str | Path) -> None:
        with atomic_open(path, "wb") as f:
            torch.save(self.state_dict(), f)
