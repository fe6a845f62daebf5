"""The sDPO loop in memory, for a model and pairs the caller already holds.

``sdpo train`` (``sdpo/runner.py``) runs sDPO from files: it loads a checkpoint folder, reads
and tokenizes the data, caches reference values on disk, writes a checkpoint per step and can
resume. A larger stack that owns its model, its data pipeline and its checkpoints needs only
the algorithm: ``run_sdpo`` is that loop, on any module that follows the packed protocol
(``model(input_ids, position_ids, cu_seqlens, max_seqlen)`` to final hidden states, and
``model.lm_head_weight``): sdpo's own decoder, or a Hugging Face causal LM (wrapped in
``sdpo.engine.hf.PackedCausalLM`` when given as it is; ``on_step_end`` then receives the
wrapper, whose parameters are the Hugging Face model's own; its dropout is off for the run and
its rates are restored after it, as the runner loads a folder with dropout off). A
``loss.router_aux_loss_coef`` holds for the run alone: a ``PackedCausalLM`` the caller passed
has its own coefficient back after it, however the run ends.

What it does, as the runner does for the same settings (a test checks that both end with the
same weights and the same per-step numbers):

1. The initial model M0 scores the pairs without gradients: all of them when the partition
   ranks by its values (``easy_to_hard``, ``easy_to_hard_pairs``) or ``report_scoring`` asks
   for the report's values, chunk 1 alone otherwise.
2. The pairs are cut into ``steps`` chunks (``sdpo.partition``).
3. Step t scores chunk t with M_{t-1}, the model as it stands (step 1 reuses M0's values), then
   trains one DPO pass over the chunk against those values, in place. So after step t the model
   is M_t, and it is the reference of step t+1. With ``reference`` (values scored beforehand by
   another model, over every pair) every step trains against those instead.

Nothing is written to disk unless ``metrics_dir`` asks the trainer for its metrics file;
there are no checkpoints and no resume. ``on_step_end(report, model)`` runs after each step,
where a caller saves what it wants. Under torch.distributed every rank calls ``run_sdpo`` with
the same pairs and its replica of the model, as ``DPOTrainer`` expects (one wrapped in
``DistributedDataParallel`` is trained through its module: the trainer sums the gradients); a
model the caller sharded with FSDP2 (``sdpo.engine.sharding.shard_model``, or its own
``fully_shard`` of the layers and the root) trains sharded, while ``train.fsdp`` alone shards
nothing here (the runner reads it when it loads the model).
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
from torch import nn

from sdpo.engine import distributed, sharding
from sdpo.engine.hf import PackedCausalLM, dropout_off, router_aux_loss_coef_for
from sdpo.engine.packing import TokenizedPair, check_pairs, check_token_ids
from sdpo.engine.precision import emulated_bf16_warning
from sdpo.engine.scoring import PairLogps, score_pairs
from sdpo.engine.trainer import (
    DPOTrainer,
    TrainConfig,
    cast_for_precision,
    check_config_type,
    check_grad_mode,
    check_reference_table,
    check_reference_tokens,
    check_trainable,
    plan_steps,
)
from sdpo.kernels import resolve_impl
from sdpo.losses import LossConfig, dpo_loss
from sdpo.partition import STRATEGIES, partition_pairs
from sdpo.report import StepReport

__all__ = ["run_sdpo"]


def _per_step(name: str, values: Sequence[float] | None, steps: int, default: float) -> list[float]:
    if values is None:
        return [default] * steps
    values = list(values)
    if len(values) != steps:
        raise ValueError(f"{name} has {len(values)} values for {steps} steps: give one per step")
    return [float(v) for v in values]


def _chunks_from(
    partition: str | Sequence[Sequence[int]], steps: int, known: set[int]
) -> list[list[int]] | None:
    """Explicit chunks checked against the pairs (None: a strategy name, cut later)."""
    if isinstance(partition, str):
        if partition not in STRATEGIES:
            raise ValueError(
                f"unknown partition {partition!r}; choose one of: {', '.join(STRATEGIES)}, "
                "or give the chunks as lists of TokenizedPair.index"
            )
        return None
    chunks = [[int(i) for i in chunk] for chunk in partition]
    if len(chunks) != steps:
        raise ValueError(f"partition has {len(chunks)} chunks for steps = {steps}")
    seen: set[int] = set()
    for t, chunk in enumerate(chunks, start=1):
        if not chunk:
            raise ValueError(f"chunk {t} of the partition is empty")
        unknown = sorted(set(chunk) - known)
        if unknown:
            raise ValueError(f"chunk {t} names pair indices {unknown[:5]} that are not in pairs")
        repeated = sorted(seen.intersection(chunk))
        if repeated or len(set(chunk)) != len(chunk):
            raise ValueError(f"chunk {t} repeats pair indices {repeated[:5] or chunk[:5]}")
        seen.update(chunk)
    return chunks


def run_sdpo(
    model: nn.Module,
    pairs: Sequence[TokenizedPair],
    *,
    steps: int = 2,
    partition: str | Sequence[Sequence[int]] = "easy_to_hard",
    train: TrainConfig | None = None,
    loss: LossConfig | None = None,
    betas: Sequence[float] | None = None,
    learning_rates: Sequence[float] | None = None,
    reference: PairLogps | None = None,
    reset_optimizer: bool = True,
    report_scoring: bool = False,
    source_order: Sequence[str] | None = None,
    kernels_impl: str = "auto",
    chunk_tokens: int | None = None,
    max_chunk_tokens: int | None = None,
    score_tokens_per_batch: int | None = None,
    progress: bool = False,
    metrics_dir: str | Path | None = None,
    log_hook: Callable[[dict], None] | None = None,
    token_metrics: bool = True,
    on_step_end: Callable[[StepReport, nn.Module], None] | None = None,
) -> list[StepReport]:
    """Run ``steps`` sDPO steps on ``model`` in place; one ``StepReport`` per step.

    ``partition``: a strategy of ``sdpo.partition`` (``easy_to_hard`` ranks the sources by M0's
    reward accuracy, in ``source_order`` on ties and for ``given``; default the order in which
    the pairs' sources first appear) or the chunks themselves, lists of ``TokenizedPair.index``.
    ``train``/``loss``: the trainer's and the loss's settings (``TrainConfig()`` and
    ``LossConfig()`` by default; ``train.seed`` also seeds the random partition). ``betas`` and
    ``learning_rates``: one value per step, overriding ``loss.beta`` and ``train.learning_rate``
    (``sdpo.beta`` / ``sdpo.learning_rate``). ``reference``: every step's reference values,
    from ``score_pairs`` of another model over every pair with the same settings (``sdpo.
    reference``). ``reset_optimizer`` False keeps one optimizer and one LR schedule across the
    steps. ``report_scoring`` (``sdpo.report_scoring``, on by default in ``sdpo train``, off
    here): the scoring passes that only fill the report, i.e. each step's chunk again after
    training (``reward_accuracy_after``) and from step 2 on the next chunk with the step's
    reference (``gamma_ref_next_chunk``); M0 then scores every pair under any partition.
    ``score_tokens_per_batch``: the scoring pass's token budget (default 4 x
    ``train.max_tokens_per_batch``). ``metrics_dir``: a folder where the trainer appends
    every logged record to ``metrics.jsonl`` (nothing is written without it). ``log_hook``
    receives every logged training record, with ``sdpo_step``; ``token_metrics`` False leaves
    TRL's token metrics out of them (``log.token_metrics``, ``DPOTrainer``); ``on_step_end(report, model)``
    runs after each step with M_t in hand."""
    check_grad_mode("run_sdpo")
    # a DistributedDataParallel wrapper's module: the trainer sums the gradients over ranks
    model = distributed.unwrap_data_parallel(model, "run_sdpo")
    if not hasattr(model, "lm_head_weight") and callable(getattr(model, "get_decoder", None)):
        model = PackedCausalLM(model)  # a Hugging Face causal LM, trained in place
    if not hasattr(model, "lm_head_weight"):
        raise TypeError(
            f"run_sdpo takes a model under sdpo's packed protocol (with lm_head_weight) or a "
            f"Hugging Face causal LM (with get_decoder()); {type(model).__name__} has neither"
        )
    check_trainable(model.hf_model if isinstance(model, PackedCausalLM) else model, "run_sdpo")
    sharding.check_trainable_sharded(model, "run_sdpo")
    if reference is not None:
        check_reference_table(reference, "run_sdpo")
    # dropout off for the run, as the runner loads a folder (sdpo's decoder has none): the
    # policy must compute the values its reference pass cached; the caller's rates come back
    off = dropout_off(model.hf_model) if isinstance(model, PackedCausalLM) else nullcontext()
    train = TrainConfig() if train is None else train
    loss = LossConfig() if loss is None else loss
    check_config_type(train, TrainConfig, "train", "run_sdpo")
    check_config_type(loss, LossConfig, "loss", "run_sdpo")
    # loss.router_aux_loss_coef: set on the model for the run (and refused for one without a
    # router loss) before any work, each step's trainer applying it again; a wrapper the
    # caller passed has its own coefficient back after the run, however it ends
    with off, router_aux_loss_coef_for(model, loss.router_aux_loss_coef):
        pairs = list(pairs)
        check_pairs(pairs, "run_sdpo")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        if len(pairs) < steps:
            raise ValueError(f"{len(pairs)} pairs cannot be cut into {steps} non-empty chunks")
        by_index = {p.index: p for p in pairs}
        check_token_ids(pairs, vocab_size=model.lm_head_weight.shape[0])
        chunks = _chunks_from(partition, steps, set(by_index))
        beta_of = _per_step("betas", betas, steps, loss.beta)
        lr_of = _per_step("learning_rates", learning_rates, steps, train.learning_rate)
        device = next(model.parameters()).device
        precision = sharding.model_precision(train.precision, model, device, who="run_sdpo")
        emulated = emulated_bf16_warning(precision, device, key="TrainConfig.precision")
        if emulated is not None:
            warnings.warn(emulated, stacklevel=2)
        impl = resolve_impl(kernels_impl, device)
        # scoring sees the weights the trainer trains: its parameter dtype from the start
        cast_for_precision(model, precision)
        if reference is not None:
            missing = sorted(set(by_index) - set(reference.pair_indices.tolist()))
            if missing:
                raise ValueError(f"reference has no values for pair indices {missing[:5]}")
            check_reference_tokens(reference, pairs, "run_sdpo")

        def score(subset: Sequence[TokenizedPair]) -> PairLogps:
            return score_pairs(
                model,
                subset,
                max_tokens_per_batch=score_tokens_per_batch or 4 * train.max_tokens_per_batch,
                impl=impl,
                chunk_tokens=chunk_tokens,
                precision=precision,
                progress=progress,
                share_prompt=train.share_prompt,
                ld_alpha=loss.ld_alpha,
            )

        sources = [p.source for p in pairs]
        order = list(source_order) if source_order is not None else list(dict.fromkeys(sources))
        partition_args = {
            "pairs_sources": sources,
            "pair_indices": [p.index for p in pairs],
            "source_order": order,
            "seed": train.seed,
        }
        t0 = time.perf_counter()
        ranks_by_gamma = isinstance(partition, str) and partition.startswith("easy_to_hard")
        initial: PairLogps | None = None
        if ranks_by_gamma:
            initial = score(pairs)
            gamma = dict(zip(initial.pair_indices.tolist(), initial.gamma.tolist(), strict=True))
            chunks = partition_pairs(
                partition, steps=steps, gamma=[gamma[p.index] for p in pairs], **partition_args
            )
        elif chunks is None:
            chunks = partition_pairs(partition, steps=steps, gamma=None, **partition_args)
        if initial is None and reference is None:  # M0's values: step 1's reference, the report's
            initial = score(pairs if report_scoring else [by_index[i] for i in chunks[0]])
        initial_s = time.perf_counter() - t0

        optimizer = None
        schedule_total, schedule_done = None, 0
        if not reset_optimizer:
            schedule_total = sum(
                len(plan_steps([by_index[i] for i in chunk], train, epoch=e))
                for chunk in chunks
                for e in range(train.epochs)
            )
        reports: list[StepReport] = []
        run_step = tokens_done = 0
        for t, chunk in enumerate(chunks, start=1):
            t0 = time.perf_counter()
            chunk_pairs = [by_index[i] for i in chunk]
            if reference is not None:
                ref = reference
            elif t == 1:
                ref = initial
            else:  # M_{t-1}: the model before this step's first update
                ref = score(chunk_pairs)
            ref_gamma = ref.gamma[ref.rows_for(torch.tensor(chunk, dtype=torch.int64))]
            # the paper's Figure 2 quantity, where it is free: step 1's reference scored every pair
            # (a partition by M0's values) or a fixed reference did
            next_gamma, source = None, None
            if t < steps:
                if reference is not None:
                    source = reference
                elif t == 1 and (ranks_by_gamma or report_scoring):
                    source = initial
                elif report_scoring:  # M_{t-1}, before this step's first update
                    source = score([by_index[i] for i in chunks[t]])
            if source is not None:
                upcoming = torch.tensor(chunks[t], dtype=torch.int64)
                next_gamma = float(source.gamma[source.rows_for(upcoming)].mean())
            scoring_s = (initial_s if t == 1 else 0.0) + time.perf_counter() - t0
            trainer = DPOTrainer(
                model,
                config=dataclasses.replace(train, learning_rate=lr_of[t - 1]),
                loss_fn=partial(dpo_loss, config=dataclasses.replace(loss, beta=beta_of[t - 1])),
                kernels_impl=impl,
                chunk_tokens=chunk_tokens,
                max_chunk_tokens=max_chunk_tokens,
                ld_alpha=loss.ld_alpha,
                output_dir=metrics_dir,
                metrics_extra={"sdpo_step": t},
                progress=progress,
                optimizer=optimizer,
                log_hook=log_hook,
                token_metrics=token_metrics,
            )
            trainer.run_step_base = run_step
            trainer.num_tokens_base = tokens_done  # num_tokens counts on across the steps
            trainer.global_step = schedule_done
            result = trainer.fit(
                chunk_pairs, ref, schedule_steps=schedule_total, schedule_offset=schedule_done
            )
            run_step += result.optimizer_steps
            tokens_done += result.tokens
            if not reset_optimizer:
                optimizer, schedule_done = trainer.optimizer, schedule_done + result.optimizer_steps
            del trainer
            acc_after = None
            if report_scoring:
                acc_after = float((score(chunk_pairs).gamma > 0).float().mean())
            report = StepReport(
                step=t,
                num_pairs=len(chunk_pairs),
                sources=sorted({p.source for p in chunk_pairs}),
                beta=beta_of[t - 1],
                learning_rate=lr_of[t - 1],
                train_metrics=result.last_metrics,
                gamma_ref_chunk=float(ref_gamma.mean()),
                gamma_ref_next_chunk=next_gamma,
                reward_accuracy_before=float((ref_gamma > 0).float().mean()),
                reward_accuracy_after=acc_after,
                train_seconds=result.seconds,
                scoring_seconds=scoring_s,
            )
            reports.append(report)
            if on_step_end is not None:
                on_step_end(report, model)
        return reports
