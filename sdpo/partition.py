"""Partitioning the preference data into the T chunks of an sDPO run.

sDPO trains step t on chunk t only. How the data is cut decides what each step sees:

- ``easy_to_hard`` (the paper): one chunk per source, sources ordered by the initial model's
  reward accuracy on them (share of pairs with gamma > 0), highest (easiest) first.
- ``easy_to_hard_pairs``: pairs sorted by the initial model's gamma, largest margin (easiest)
  first, cut into T near-equal contiguous chunks; for data with one source or T != #sources.
- ``random`` (the paper's ablation): all pairs pooled, permuted with a seed, cut into T chunks.
- ``given``: one chunk per source in the order the user listed them.

Before any of these, ``split_held_out`` can set aside a seeded random share of the pairs as
held-out evaluation data (``data.eval_fraction``), which no chunk then contains.

``gamma`` is the initial model's log-ratio log pi(chosen|x) - log pi(rejected|x) per pair, from
the same scoring pass that fills step 1's reference cache. Everything here works on plain lists
and arrays; nothing loads a model. With ``steps = 1`` every strategy gives one chunk holding all
pairs in input order (plain DPO over all data).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

__all__ = [
    "STRATEGIES",
    "ChunkSummary",
    "PartitionReport",
    "describe_partition",
    "partition_easy_to_hard",
    "partition_easy_to_hard_pairs",
    "partition_given",
    "partition_pairs",
    "partition_random",
    "split_held_out",
]

STRATEGIES = ("easy_to_hard", "easy_to_hard_pairs", "random", "given")

ArrayLike = Sequence[float] | Sequence[int] | np.ndarray | torch.Tensor


def _as_numpy(x: ArrayLike, dtype: type) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype).reshape(-1)


@dataclass
class _Pairs:
    """Validated per-pair columns, aligned by position."""

    sources: list[str]
    indices: np.ndarray  # (P,) int64
    gamma: np.ndarray  # (P,) float64
    source_order: list[str]  # every present source exactly once, in the user's order
    scored: np.ndarray | None = None  # (P,) bool: gamma is known (None: for every pair)

    def positions_of(self, source: str) -> list[int]:
        return [i for i, s in enumerate(self.sources) if s == source]

    def _known(self, positions: Sequence[int]) -> np.ndarray:
        pos = np.asarray(list(positions), dtype=np.int64)
        return pos if self.scored is None else pos[self.scored[pos]]

    def reward_accuracy(self, positions: Sequence[int]) -> float | None:
        """Share of pairs with gamma > 0 among ``positions``; NaN for none, None when the
        initial model scored none of them."""
        if len(positions) == 0:
            return float("nan")
        known = self._known(positions)
        return float(np.mean(self.gamma[known] > 0)) if len(known) else None

    def mean_gamma(self, positions: Sequence[int]) -> float | None:
        if len(positions) == 0:
            return float("nan")
        known = self._known(positions)
        return float(np.mean(self.gamma[known])) if len(known) else None


def _validate(
    *,
    pairs_sources: Sequence[str],
    pair_indices: ArrayLike,
    gamma: ArrayLike,
    steps: int,
    source_order: Sequence[str] | None,
    unscored: Collection[int] = (),
) -> _Pairs:
    sources = [str(s) for s in pairs_sources]
    indices = _as_numpy(pair_indices, np.int64)
    g = _as_numpy(gamma, np.float64)
    scored = None
    if len(unscored):
        scored = ~np.isin(indices, np.fromiter(unscored, dtype=np.int64))
    if not (len(sources) == len(indices) == len(g)):
        raise ValueError(
            f"partition inputs must have one entry per pair: pairs_sources has {len(sources)}, "
            f"pair_indices {len(indices)}, gamma {len(g)}"
        )
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"sdpo.steps must be a positive integer, got {steps!r}")
    if len(indices) == 0:
        raise ValueError("cannot partition an empty data set: no preference pairs were read")
    uniq, counts = np.unique(indices, return_counts=True)
    if len(uniq) != len(indices):
        raise ValueError(f"pair_indices must be unique; repeated: {uniq[counts > 1][:5].tolist()}")
    bad = ~np.isfinite(g) if scored is None else scored & ~np.isfinite(g)
    if bad.any():
        raise ValueError(
            f"gamma is not finite for pair indices {indices[bad][:5].tolist()}: the initial "
            "model's scoring pass produced NaN/inf log-probs; check the model and dtype"
        )
    present = list(dict.fromkeys(sources))
    if source_order is None:
        order = present
    else:
        order = list(dict.fromkeys(str(s) for s in source_order))
        unknown = [s for s in present if s not in order]
        if unknown:
            raise ValueError(
                f"pairs come from sources {unknown} that are not in the source order {order}; "
                "list every data source"
            )
        empty = [s for s in order if s not in present]
        if empty:
            raise ValueError(
                f"sources {empty} have no pairs; remove them from the data sources or check "
                "their files"
            )
    return _Pairs(sources=sources, indices=indices, gamma=g, source_order=order, scored=scored)


def _split_near_equal(items: Sequence[int], steps: int) -> list[list[int]]:
    """Cut into ``steps`` contiguous chunks whose sizes differ by at most one (larger first)."""
    if steps > len(items):
        raise ValueError(
            f"cannot cut {len(items)} pairs into {steps} steps: every step needs at least one "
            "pair; lower sdpo.steps or add data"
        )
    base, extra = divmod(len(items), steps)
    chunks, start = [], 0
    for t in range(steps):
        size = base + (1 if t < extra else 0)
        chunks.append([int(i) for i in items[start : start + size]])
        start += size
    return chunks


def _by_source(p: _Pairs, order: Sequence[str]) -> list[list[int]]:
    return [[int(p.indices[i]) for i in p.positions_of(s)] for s in order]


def _all_in_one(p: _Pairs) -> list[list[int]]:
    return [[int(i) for i in p.indices]]


def _easy_to_hard_source_order(p: _Pairs) -> list[str]:
    rank = {s: k for k, s in enumerate(p.source_order)}
    acc = {s: p.reward_accuracy(p.positions_of(s)) for s in p.source_order}
    # Highest reward accuracy (easiest) first; equal accuracies keep the user's order.
    return sorted(p.source_order, key=lambda s: (-acc[s], rank[s]))


def partition_easy_to_hard(
    *,
    pairs_sources: Sequence[str],
    pair_indices: ArrayLike,
    gamma: ArrayLike,
    steps: int,
    source_order: Sequence[str] | None = None,
) -> list[list[int]]:
    """One chunk per source, sources ordered by the initial model's reward accuracy (share of
    their pairs with gamma > 0), highest first; ties keep ``source_order``."""
    p = _validate(
        pairs_sources=pairs_sources,
        pair_indices=pair_indices,
        gamma=gamma,
        steps=steps,
        source_order=source_order,
    )
    if steps == 1:
        return _all_in_one(p)
    n = len(p.source_order)
    if n != steps:
        raise ValueError(
            f'partition = "easy_to_hard" makes one chunk per data source, but there are {n} '
            f"source(s) ({', '.join(p.source_order)}) and sdpo.steps = {steps}. Set "
            f'sdpo.steps = {n}, or use partition = "easy_to_hard_pairs" to cut the pairs by '
            f"difficulty into {steps} chunks."
        )
    return _by_source(p, _easy_to_hard_source_order(p))


def partition_easy_to_hard_pairs(
    *,
    pair_indices: ArrayLike,
    gamma: ArrayLike,
    steps: int,
    pairs_sources: Sequence[str] | None = None,
    source_order: Sequence[str] | None = None,
) -> list[list[int]]:
    """Pairs sorted by gamma descending (largest margin = easiest first; ties by pair index),
    cut into ``steps`` near-equal contiguous chunks."""
    n = len(_as_numpy(pair_indices, np.int64))
    p = _validate(
        pairs_sources=pairs_sources if pairs_sources is not None else [""] * n,
        pair_indices=pair_indices,
        gamma=gamma,
        steps=steps,
        source_order=source_order,
    )
    if steps == 1:
        return _all_in_one(p)
    order = np.lexsort((p.indices, -p.gamma))  # last key is primary: gamma descending
    return _split_near_equal(p.indices[order].tolist(), steps)


def partition_random(
    *,
    pair_indices: ArrayLike,
    steps: int,
    seed: int,
    pairs_sources: Sequence[str] | None = None,
    gamma: ArrayLike | None = None,
    source_order: Sequence[str] | None = None,
) -> list[list[int]]:
    """All pairs pooled, permuted with ``seed``, cut into ``steps`` near-equal chunks. The
    permutation is of the sorted pair indices, so it depends only on the pair set and the seed,
    not on the order the pairs arrive in."""
    n = len(_as_numpy(pair_indices, np.int64))
    p = _validate(
        pairs_sources=pairs_sources if pairs_sources is not None else [""] * n,
        pair_indices=pair_indices,
        gamma=gamma if gamma is not None else np.zeros(n),
        steps=steps,
        source_order=source_order,
    )
    if steps == 1:
        return _all_in_one(p)
    pool = np.sort(p.indices)
    perm = np.random.default_rng(seed).permutation(len(pool))
    return _split_near_equal(pool[perm].tolist(), steps)


def partition_given(
    *,
    pairs_sources: Sequence[str],
    pair_indices: ArrayLike,
    steps: int,
    source_order: Sequence[str] | None = None,
    gamma: ArrayLike | None = None,
) -> list[list[int]]:
    """One chunk per source in ``source_order`` (the user's order); ``steps = 1``: all pairs in
    one chunk."""
    n = len(_as_numpy(pair_indices, np.int64))
    p = _validate(
        pairs_sources=pairs_sources,
        pair_indices=pair_indices,
        gamma=gamma if gamma is not None else np.zeros(n),
        steps=steps,
        source_order=source_order,
    )
    if steps == 1:
        return _all_in_one(p)
    k = len(p.source_order)
    if k != steps:
        raise ValueError(
            f'partition = "given" makes one chunk per data source, but there are {k} '
            f"source(s) ({', '.join(p.source_order)}) and sdpo.steps = {steps}. Set "
            f'sdpo.steps = {k} (or 1 for plain DPO), or use partition = "random" or '
            f'"easy_to_hard_pairs" to cut the pairs into {steps} chunks.'
        )
    return _by_source(p, p.source_order)


def split_held_out(pairs: Sequence, *, fraction: float, seed: int) -> tuple[list, list]:
    """(kept, held_out): ``round(fraction · n)`` pairs (at least one) drawn at random with
    ``seed``, as a train/test split does; both lists keep the input order.

    Raises ValueError when the split would leave either side empty."""
    n = len(pairs)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"data.eval_fraction must be in (0, 1), got {fraction}")
    k = max(1, round(fraction * n))
    if k >= n:
        raise ValueError(
            f"data.eval_fraction = {fraction} of {n} pairs would hold out {k} and leave none to "
            "train on; lower data.eval_fraction or add data"
        )
    gen = torch.Generator().manual_seed(seed)
    held = set(torch.randperm(n, generator=gen)[:k].tolist())
    kept = [p for i, p in enumerate(pairs) if i not in held]
    return kept, [p for i, p in enumerate(pairs) if i in held]


def partition_pairs(
    strategy: str,
    *,
    pairs_sources: Sequence[str],
    pair_indices: ArrayLike,
    gamma: ArrayLike | None,
    steps: int,
    source_order: Sequence[str] | None = None,
    seed: int = 0,
) -> list[list[int]]:
    """Chunks of pair indices (``TokenizedPair.index``), step 1 first, by ``strategy``
    (one of :data:`STRATEGIES`). ``gamma`` (the initial model's, one per pair) may be None for
    the strategies that do not rank by it: random and given."""
    if gamma is None and strategy in ("easy_to_hard", "easy_to_hard_pairs"):
        raise ValueError(f"partition {strategy!r} ranks by the initial model's gamma: give it")
    common = dict(
        pairs_sources=pairs_sources,
        pair_indices=pair_indices,
        gamma=gamma,
        steps=steps,
        source_order=source_order,
    )
    if strategy == "easy_to_hard":
        return partition_easy_to_hard(**common)
    if strategy == "easy_to_hard_pairs":
        return partition_easy_to_hard_pairs(**common)
    if strategy == "random":
        return partition_random(**common, seed=seed)
    if strategy == "given":
        return partition_given(**common)
    raise ValueError(f"unknown sdpo.partition {strategy!r}; choose one of: {', '.join(STRATEGIES)}")


# ---------------------------------------------------------------------------------------------
# What the partition looks like, for the run's report


@dataclass(kw_only=True)
class ChunkSummary:
    step: int  # 1-based sDPO step that trains on this chunk
    num_pairs: int
    sources: dict[str, int]  # source -> number of its pairs in this chunk
    # the initial model's share of the chunk's pairs with gamma > 0 and its mean gamma there;
    # None for a chunk it did not score (see describe_partition)
    reward_accuracy: float | None
    mean_gamma: float | None


@dataclass(kw_only=True)
class PartitionReport:
    strategy: str
    steps: int
    seed: int | None  # only meaningful for "random"
    # The difficulty that drives easy-to-hard orders: the initial model's reward accuracy per
    # source (share of pairs with gamma > 0), in the user's source order.
    # Over the pairs the initial model scored; None for a source it scored none of.
    source_reward_accuracy: dict[str, float | None]
    source_num_pairs: dict[str, int]
    chunks: list[ChunkSummary] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        lines = [f"partition {self.strategy!r} into {self.steps} step(s)"]
        if self.strategy == "random":
            lines[0] += f" (seed {self.seed})"
        lines.append("  initial model reward accuracy per source (share of pairs with gamma > 0):")
        width = max((len(s) for s in self.source_reward_accuracy), default=0)
        for s, acc in self.source_reward_accuracy.items():
            shown = "     -" if acc is None else f"{acc:6.3f}"
            lines.append(f"    {s:<{width}}  {shown}  ({self.source_num_pairs[s]} pairs)")
        for c in self.chunks:
            comp = ", ".join(f"{s}: {k}" for s, k in c.sources.items())
            if c.reward_accuracy is None or c.mean_gamma is None:
                numbers = "not scored by the initial model"
            else:
                numbers = f"reward accuracy {c.reward_accuracy:.3f}, mean gamma {c.mean_gamma:.3f}"
            lines.append(f"  step {c.step}: {c.num_pairs} pairs, {numbers} [{comp}]")
        return "\n".join(lines)


def describe_partition(
    strategy: str,
    chunks: Sequence[Sequence[int]],
    *,
    pairs_sources: Sequence[str],
    pair_indices: ArrayLike,
    gamma: ArrayLike,
    source_order: Sequence[str] | None = None,
    seed: int | None = None,
    unscored: Collection[int] = (),
) -> PartitionReport:
    """Per-chunk source composition and the initial model's difficulty numbers for ``chunks``
    (as returned by :func:`partition_pairs` with the same inputs). ``unscored``: indices of the
    pairs the initial model did not score (their ``gamma`` entries are ignored); the numbers
    then cover the scored pairs, and a chunk or source with none of them reports None."""
    p = _validate(
        pairs_sources=pairs_sources,
        pair_indices=pair_indices,
        gamma=gamma,
        steps=max(len(chunks), 1),
        source_order=source_order,
        unscored=unscored,
    )
    where = {int(idx): pos for pos, idx in enumerate(p.indices)}
    summaries = []
    for t, chunk in enumerate(chunks, start=1):
        try:
            pos = [where[int(i)] for i in chunk]
        except KeyError as e:
            raise ValueError(
                f"chunk {t} holds pair index {e.args[0]}, which is not in the data"
            ) from None
        comp: dict[str, int] = {}
        for i in pos:
            comp[p.sources[i]] = comp.get(p.sources[i], 0) + 1
        # Sources listed in the user's order for a stable, readable report.
        comp = {s: comp[s] for s in p.source_order if s in comp}
        summaries.append(
            ChunkSummary(
                step=t,
                num_pairs=len(pos),
                sources=comp,
                reward_accuracy=p.reward_accuracy(pos),
                mean_gamma=p.mean_gamma(pos),
            )
        )
    return PartitionReport(
        strategy=strategy,
        steps=len(chunks),
        seed=seed if strategy == "random" else None,
        source_reward_accuracy={s: p.reward_accuracy(p.positions_of(s)) for s in p.source_order},
        source_num_pairs={s: len(p.positions_of(s)) for s in p.source_order},
        chunks=summaries,
    )
