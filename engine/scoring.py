"""The no-grad scoring pass: per-pair summed completion log-probs of one model on a set of pairs.

It serves three callers with one code path, so their numbers agree to the last bit: the reference
cache (the reference model's values for a chunk), the sDPO partitioner (the initial model's γ per
pair, which is the same pass as step 1's reference) and `sdpo score`. It runs the same forward
and log-prob op as training, on larger token budgets because nothing is kept for backward; with
LD-DPO (``ld_alpha``) its sums are length-desensitized exactly as the training forward's.

Data parallel (a process group of more than one rank, ``sdpo.engine.distributed``): each rank
scores one contiguous shard of the pairs, about equal in tokens
(``distributed.contiguous_bounds``), and the shards are all-gathered, so every rank returns the
same table. Batches are cut within a shard, so values can differ from a single-process pass by
float rounding (a different batch composition), not more. With a mixture of experts' router
loss, a value of the whole batch, the shards end where one process's batches end, so the ranks
score exactly its batches and each batch's router loss is the one one process gets. A sharded
model (``train.fsdp``, ``engine/sharding.py``) gathers its parameters in collectives, so every
rank runs as many forward passes as the rank with the most batches (the others score a filler
pair whose values are dropped).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from sdpo.engine import distributed, sharding
from sdpo.engine.packing import (
    TokenizedPair,
    batch_by_token_budget,
    check_ld_alpha,
    check_pairs,
    check_token_ids,
    head_rows,
    pack_pairs,
    pack_pairs_shared,
    to_device,
)
from sdpo.engine.precision import autocast_context, head_inputs
from sdpo.engine.resume import fault_point
from sdpo.kernels import sequence_logprobs, softcap_sequence_logprobs


def logprob_head(model: torch.nn.Module) -> Callable[..., Tensor | tuple[Tensor, Tensor]]:
    """The per-sequence log-prob op for ``model``'s logits, with ``sequence_logprobs``'
    arguments: that op itself, or, for a model whose ``logit_softcap`` is set (Gemma 2's
    ``final_logit_softcapping``, ``PackedCausalLM``), ``softcap_sequence_logprobs`` with that
    cap, which runs in PyTorch whatever ``impl`` says. The scoring pass and the training
    forward both take their head from here, so their numbers agree."""
    cap = getattr(model, "logit_softcap", None)
    if cap is None:
        return sequence_logprobs

    def capped(*args, impl: str = "auto", **kwargs):
        del impl  # one implementation
        return softcap_sequence_logprobs(*args, softcap=cap, **kwargs)

    return capped


@dataclass(kw_only=True)
class PairLogps:
    """Per-pair summed log-probs, in the order of ``pair_indices`` (float32 / int64, on CPU)."""

    pair_indices: Tensor  # (P,) int64
    chosen_logps: Tensor  # (P,) float32
    rejected_logps: Tensor  # (P,) float32
    chosen_tokens: Tensor  # (P,) int64
    rejected_tokens: Tensor  # (P,) int64
    # WPO (score_pairs(return_aligned=True)): each completion's sum of token_logp - log sum p^2
    chosen_aligned: Tensor | None = None  # (P,) float32
    rejected_aligned: Tensor | None = None  # (P,) float32
    # LD-DPO (score_pairs(return_raw=True)): each completion's unweighted sum
    chosen_raw: Tensor | None = None  # (P,) float32
    rejected_raw: Tensor | None = None  # (P,) float32
    # the token metrics (score_pairs(return_stats=True)): each completion's sums over its tokens
    # of the entropy, the mean logit and the top-1 flag (sdpo.kernels.logprobs.STAT_NAMES)
    chosen_stats: Tensor | None = None  # (P, 3) float32
    rejected_stats: Tensor | None = None  # (P, 3) float32
    # a mixture of experts' router load-balancing loss (score_pairs(return_router_loss=True)):
    # each pair's the one of the batch it was scored in, so that the mean over the pairs is
    # the batches' mean weighted by their pairs
    router_loss: Tensor | None = None  # (P,) float32

    def token_metrics(self) -> dict[str, float]:
        """The token metrics over every pair of the table (``return_stats``), each token
        weighing the same: ``entropy`` over the chosen and rejected completion tokens,
        ``logits/chosen`` / ``logits/rejected`` (the mean logit) over each side's tokens and
        ``mean_token_accuracy`` over the chosen tokens (0 where there are no tokens)."""
        if self.chosen_stats is None or self.rejected_stats is None:
            raise ValueError("these values were scored without return_stats=True")
        chosen, rejected = self.chosen_stats.double().sum(0), self.rejected_stats.double().sum(0)
        n_c, n_r = int(self.chosen_tokens.sum()), int(self.rejected_tokens.sum())

        def mean(total: Tensor, count: int) -> float:
            return float(total) / count if count > 0 else 0.0

        return {
            "entropy": mean(chosen[0] + rejected[0], n_c + n_r),
            "logits/chosen": mean(chosen[1], n_c),
            "logits/rejected": mean(rejected[1], n_r),
            "mean_token_accuracy": mean(chosen[2], n_c),
        }

    @property
    def gamma(self) -> Tensor:
        """log π(y_w|x) - log π(y_l|x) per pair."""
        return self.chosen_logps - self.rejected_logps

    def rows_for(self, pair_indices: Tensor) -> Tensor:
        """Row positions in this table of the given pair indices (error if one is missing).

        Any int64 index works (a caller's own ids may be sparse, huge or negative): the lookup
        is a binary search in the sorted indices, its memory the table's size, not the largest
        index's. The sorted view is made once per table (the trainer looks up every
        micro-batch) and made again if ``pair_indices`` is replaced or changed in place."""
        indices = self.pair_indices
        cached = self.__dict__.get("_sorted")
        if cached is None or cached[0] is not indices or cached[1] != indices._version:
            order = torch.argsort(indices, stable=True)
            cached = (indices, indices._version, order, indices[order])
            self.__dict__["_sorted"] = cached
        _, _, order, known = cached  # known: (P,) sorted
        at = torch.searchsorted(known, pair_indices).clamp_(max=len(known) - 1)
        found = known[at] == pair_indices
        if not bool(found.all()):
            missing = pair_indices[~found][:5].tolist()
            raise KeyError(f"no reference values for pairs {missing} (first five shown)")
        return order[at]


def check_packed_model(model: torch.nn.Module, who: str) -> None:
    """Refuse a model without the packed protocol's ``lm_head_weight`` before any work: a
    Hugging Face causal LM given as it is would otherwise fail deep inside its own forward
    (transformers reads the packed ``cu_seqlens`` as a cache) with an error that names neither."""
    if hasattr(model, "lm_head_weight"):
        return
    hint = (
        "; wrap a Hugging Face causal LM in sdpo.engine.hf.PackedCausalLM (run_sdpo does so itself)"
        if callable(getattr(model, "get_decoder", None))
        else ""
    )
    raise TypeError(
        f"{who} takes a model under sdpo's packed protocol (model(input_ids, position_ids, "
        f"cu_seqlens, max_seqlen) -> hidden states, and lm_head_weight); "
        f"{type(model).__name__} has no lm_head_weight{hint}"
    )


@torch.no_grad()
def score_pairs(
    model: torch.nn.Module,
    pairs: Sequence[TokenizedPair],
    *,
    max_tokens_per_batch: int,
    impl: str = "auto",
    chunk_tokens: int | None = None,
    precision: str = "auto",
    progress: bool = False,
    share_prompt: bool = False,
    data_parallel: bool | None = None,
    ld_alpha: float | None = None,
    return_aligned: bool = False,
    return_raw: bool = False,
    return_stats: bool = False,
    return_router_loss: bool = False,
) -> PairLogps:
    """Score every pair with ``model`` (no gradients), batching to a token budget.

    The model must map ``(input_ids, position_ids, cu_seqlens, max_seqlen)`` to final hidden
    states and expose ``lm_head_weight``. ``share_prompt``: compute each prompt once (the
    model's forward then also takes ``shared_prefix=``; see ``engine/packing.py``); the batches
    are the same, the values equal up to float rounding. ``data_parallel`` (default: whether a
    process group of more than one rank is up) shards the pairs over ranks (module docstring);
    every rank must then call this with the same pairs. ``ld_alpha`` (LD-DPO): each
    completion's tokens past its pair's shorter length count ld_alpha times
    (``engine/packing.py``), as in the training forward; None: plain sums. ``return_aligned``
    (WPO): also each completion's sum of ``token_logp - log sum_v p_v^2`` from the same pass,
    as the training forward forms it for ``loss.use_weighting``. ``return_raw`` (LD-DPO with a
    chosen NLL term): also each completion's unweighted sum, from the head run once more
    without the LD weights. ``return_stats``: also each completion's sums of the token
    metrics (``chosen_stats`` / ``rejected_stats``), from the same pass as its log-probs.
    ``precision``: one of ``PRECISIONS`` (``engine/precision.py``), by default ``auto``,
    resolved as ``DPOTrainer`` resolves it (its default too, so a reference scored with the
    defaults is scored as the defaults train: a model its caller sharded in the precision its
    ``MixedPrecisionPolicy`` computes in, a plain one in fp32 on a CPU and ``bf16-mixed`` on a
    GPU that computes in bf16); one a caller's ``MixedPrecisionPolicy`` contradicts (fp32 over
    shards gathered in bf16) is refused. ``return_router_loss`` (the eval pass of a mixture of
    experts, ``PackedCausalLM`` with a
    router loss): also each pair's batch's router load-balancing loss (``router_loss``),
    from the same forward; the log-probs are the same with it or without. A model wrapped in
    ``DistributedDataParallel`` is scored through the module it wraps
    (``distributed.unwrap_data_parallel``)."""
    model = distributed.unwrap_data_parallel(model, "score_pairs")
    check_packed_model(model, "score_pairs")
    # a known name (a misspelt one scored as fp32); "auto" resolved as the trainer resolves it,
    # and a MixedPrecisionPolicy of the caller's that computes otherwise refused
    device = next(model.parameters()).device
    precision = sharding.model_precision(
        precision, model, device, who="score_pairs", training=False
    )
    check_ld_alpha(ld_alpha)
    if return_router_loss and not getattr(model, "router_aux_loss_coef", 0.0):
        raise ValueError(
            f"return_router_loss: {type(model).__name__} computes no router loss (not a "
            "mixture of experts in PackedCausalLM, or its router_aux_loss_coef is 0)"
        )
    if not pairs:
        raise ValueError("score_pairs needs at least one pair")
    check_pairs(pairs, "score_pairs")
    # every pair, on every rank: a bad id is refused before any batch, by all ranks alike
    check_token_ids(pairs, vocab_size=model.lm_head_weight.shape[0])
    if data_parallel is None:
        data_parallel = distributed.active()
    local = pairs
    passes = 0
    if data_parallel:
        bounds = _shard_bounds(
            pairs, max_tokens_per_batch=max_tokens_per_batch, whole_batches=return_router_loss
        )
        start, end = bounds[distributed.rank()]
        local = pairs[start:end]
        if sharding.is_sharded(model):
            passes = max(
                len(batch_by_token_budget(pairs[a:b], max_tokens=max_tokens_per_batch))
                if b > a
                else 0
                for a, b in bounds
            )
    # a mixture of experts' eval pass: each forward keeps its router loss (PackedCausalLM)
    record = model.recording_router_loss() if return_router_loss else contextlib.nullcontext()
    with record:
        columns = _score_local(
            model,
            local,
            max_tokens_per_batch=max_tokens_per_batch,
            impl=impl,
            chunk_tokens=chunk_tokens,
            precision=precision,
            progress=progress and distributed.is_main(),
            share_prompt=share_prompt,
            passes=passes,
            filler=pairs[0],
            ld_alpha=ld_alpha,
            return_aligned=return_aligned,
            return_raw=return_raw,
            return_stats=return_stats,
            return_router_loss=return_router_loss,
        )
    if data_parallel:
        parts = distributed.all_gather_object(columns)
        columns = [torch.cat([part[i] for part in parts]) for i in range(len(columns))]
    chosen, rejected, *extra = columns
    router = extra.pop() if return_router_loss else None  # the last column
    stats = []
    if return_stats:  # the last six columns: chosen's three sums, then rejected's
        stats = [torch.stack(extra[-6:-3], dim=1), torch.stack(extra[-3:], dim=1)]
        extra = extra[:-6]
    aligned = extra[:2] if return_aligned else []
    raw = extra[-2:] if return_raw else []
    return PairLogps(
        pair_indices=torch.tensor([p.index for p in pairs], dtype=torch.int64),
        chosen_logps=chosen,
        rejected_logps=rejected,
        chosen_tokens=torch.tensor([len(p.chosen_ids) for p in pairs], dtype=torch.int64),
        rejected_tokens=torch.tensor([len(p.rejected_ids) for p in pairs], dtype=torch.int64),
        chosen_aligned=aligned[0] if aligned else None,
        rejected_aligned=aligned[1] if aligned else None,
        chosen_raw=raw[0] if raw else None,
        rejected_raw=raw[1] if raw else None,
        chosen_stats=stats[0] if stats else None,
        rejected_stats=stats[1] if stats else None,
        router_loss=router,
    )


def _shard_bounds(
    pairs: Sequence[TokenizedPair], *, max_tokens_per_batch: int, whole_batches: bool
) -> list[tuple[int, int]]:
    """Each rank's contiguous range ``[start, end)`` of ``pairs``, about equal in tokens.
    ``whole_batches``: the ranges end where the one-process pass's batches end, so every rank
    cuts its range into exactly those batches (next-fit from a batch's first pair refills the
    same batches) and a value of a whole batch, a mixture of experts' router loss, is the one
    one process gets; otherwise the ranges split at any pair."""
    world = distributed.world()
    if not whole_batches:
        return distributed.contiguous_bounds([p.num_tokens for p in pairs], world)
    batches = batch_by_token_budget(pairs, max_tokens=max_tokens_per_batch)
    tokens = [sum(pairs[i].num_tokens for i in batch) for batch in batches]
    starts = [0]  # the first pair of each batch, then the end
    for batch in batches:
        starts.append(starts[-1] + len(batch))
    return [(starts[a], starts[b]) for a, b in distributed.contiguous_bounds(tokens, world)]


def _score_local(
    model: torch.nn.Module,
    pairs: Sequence[TokenizedPair],
    *,
    max_tokens_per_batch: int,
    impl: str,
    chunk_tokens: int | None,
    precision: str,
    progress: bool,
    share_prompt: bool,
    passes: int = 0,
    filler: TokenizedPair | None = None,
    ld_alpha: float | None = None,
    return_aligned: bool = False,
    return_raw: bool = False,
    return_stats: bool = False,
    return_router_loss: bool = False,
) -> list[Tensor]:
    """[chosen, rejected] summed log-probs of ``pairs`` (CPU float32; empty for no pairs), then
    with ``return_aligned`` [chosen, rejected] WPO sums, then with ``return_raw`` [chosen,
    rejected] unweighted sums, then with ``return_stats`` chosen's three token-metric sums and
    rejected's, then with ``return_router_loss`` each pair's batch's router loss (the model
    inside ``recording_router_loss()``). ``passes``: run at least this many forward passes,
    the extra ones on ``filler`` (their values dropped)."""
    columns = 2 * (1 + return_aligned + return_raw) + 6 * return_stats + return_router_loss
    if not pairs and passes == 0:
        return [torch.empty(0, dtype=torch.float32) for _ in range(columns)]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:  # the caller's mode comes back however the pass ends (a bad pair, an interrupt)
        batches = (
            batch_by_token_budget(pairs, max_tokens=max_tokens_per_batch, shuffle=False)
            if pairs
            else []
        )
        real = len(batches)
        batches += [[0]] * max(0, passes - real)
        # (columns, P): chosen, rejected, then WPO's chosen, rejected, then the raw ones
        values = torch.empty(columns, len(pairs), dtype=torch.float32, device=device)
        iterator = batches
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(batches, desc="scoring", unit="batch", leave=False)
        for n, positions in enumerate(iterator):
            if n >= real:  # a filler pass (sharded model): the forward only, for its collectives
                host_batch = pack_pairs([filler])
                batch = to_device(host_batch, device)
                with autocast_context(precision, device):
                    model(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen)
                if return_router_loss:
                    model.pop_aux_loss()  # the filler's: dropped
                continue
            fault_point("score_batch")
            chunk = [pairs[i] for i in positions]
            host_batch = pack_pairs_shared(chunk) if share_prompt else pack_pairs(chunk)
            batch = to_device(host_batch, device)
            # the rows with a label, with their LD-DPO weights
            head = to_device(head_rows(host_batch, ld_alpha=ld_alpha), device)
            # shared_prefix only with shared prompts: a model without them need not take it
            shared = {"shared_prefix": batch.shared_prefix} if share_prompt else {}
            with autocast_context(precision, device):
                hidden = model(
                    batch.input_ids,
                    batch.position_ids,
                    batch.cu_seqlens,
                    batch.max_seqlen,
                    **shared,
                )
            # the head's inputs as the training forward rounds them (engine/precision.py)
            hidden, weight = head_inputs(
                hidden.index_select(0, head.index), sharding.gathered_head_weight(model), precision
            )  # (M, H): only rows with a label
            head_sums = functools.partial(
                logprob_head(model),
                hidden,
                weight,
                head.labels,
                head.seq_ids,
                batch.num_seqs,
                impl=impl,
                chunk_tokens=chunk_tokens,
            )
            # (S,) with S = 2P: chosen, rejected interleaved (and WPO's sums alike)
            sums = head_sums(
                token_weights=head.token_weights,
                return_aligned=return_aligned,
                return_stats=return_stats,
            )
            sums = list(sums) if return_aligned or return_stats else [sums]
            stats = sums.pop() if return_stats else None  # (S, 3)
            if return_raw:  # LD-DPO's unweighted sums: the head once more, without the weights
                sums.append(head_sums())
            rows = to_device(torch.tensor(positions, dtype=torch.int64), device)
            for k, seq in enumerate(sums):
                values[2 * k, rows] = seq[0::2].float()
                values[2 * k + 1, rows] = seq[1::2].float()
            if stats is not None:  # the last six rows: chosen's three statistics, then rejected's
                at = 2 * len(sums)
                values[at : at + 3, rows] = stats[0::2].t()
                values[at + 3 : at + 6, rows] = stats[1::2].t()
            if return_router_loss:  # the last row: the batch's router loss, for each of its pairs
                values[-1, rows] = model.pop_aux_loss().float()
        sharding.reshard(model)  # free the gathered root parameters
    finally:
        model.train(was_training)
    return list(values.cpu().unbind(0))
