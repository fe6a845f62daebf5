"""Partition strategies produce their documented orders on data built so the order is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdpo.partition import (
    STRATEGIES,
    describe_partition,
    partition_easy_to_hard,
    partition_easy_to_hard_pairs,
    partition_given,
    partition_pairs,
    partition_random,
    split_held_out,
)


def build_sources(spec: dict[str, tuple[int, int]], *, seed: int) -> dict:
    """Pairs of several sources, interleaved at random; ``spec[source] = (num_pairs,
    num_pairs_with_gamma_above_0)`` fixes each source's reward accuracy exactly."""
    rng = np.random.default_rng(seed)
    sources, gamma = [], []
    for name, (n, k) in spec.items():
        mag = np.abs(rng.standard_normal(n)) * 10 + 0.01
        g = np.concatenate([mag[:k], -mag[k:]])
        gamma.extend(rng.permutation(g).tolist())
        sources.extend([name] * n)
    total = len(sources)
    shuffle = rng.permutation(total)
    return dict(
        pairs_sources=[sources[i] for i in shuffle],
        pair_indices=rng.permutation(10 * total)[:total],  # unique, unordered ids
        gamma=np.asarray(gamma, dtype=np.float32)[shuffle],
    )


# given order hard, medium, easy; reward accuracies 3/13, 9/17, 10/11
THREE = {"hard": (13, 3), "medium": (17, 9), "easy": (11, 10)}


def indices_of(data: dict, source: str) -> list[int]:
    return [int(i) for s, i in zip(data["pairs_sources"], data["pair_indices"]) if s == source]


def test_easy_to_hard_orders_sources_by_reward_accuracy_highest_first():
    data = build_sources(THREE, seed=0)
    chunks = partition_easy_to_hard(**data, steps=3, source_order=list(THREE))
    assert chunks == [indices_of(data, s) for s in ("easy", "medium", "hard")]


def test_easy_to_hard_order_does_not_depend_on_the_given_order():
    data = build_sources(THREE, seed=1)
    a = partition_easy_to_hard(**data, steps=3, source_order=["hard", "medium", "easy"])
    b = partition_easy_to_hard(**data, steps=3, source_order=["easy", "hard", "medium"])
    assert a == b


def test_easy_to_hard_breaks_accuracy_ties_by_the_given_order():
    # b and c both have reward accuracy 1/3 (different sizes); a is easier
    data = build_sources({"c": (9, 3), "a": (7, 6), "b": (15, 5)}, seed=2)
    chunks = partition_easy_to_hard(**data, steps=3, source_order=["c", "a", "b"])
    assert chunks == [indices_of(data, s) for s in ("a", "c", "b")]
    chunks = partition_easy_to_hard(**data, steps=3, source_order=["b", "c", "a"])
    assert chunks == [indices_of(data, s) for s in ("a", "b", "c")]


def test_easy_to_hard_with_steps_unequal_to_sources_says_what_to_do():
    data = build_sources(THREE, seed=3)
    with pytest.raises(ValueError, match="3 source.*steps = 2.*easy_to_hard_pairs"):
        partition_easy_to_hard(**data, steps=2, source_order=list(THREE))


def test_easy_to_hard_pairs_sorts_by_gamma_descending_ties_by_index():
    rng = np.random.default_rng(4)
    n = 41
    gamma = rng.integers(-3, 4, size=n).astype(np.float64) * 0.5  # many exact ties
    indices = rng.permutation(1000)[:n]
    chunks = partition_easy_to_hard_pairs(pair_indices=indices, gamma=gamma, steps=3)
    truth = [i for _, i in sorted(zip(-gamma, indices.tolist()))]
    assert [i for c in chunks for i in c] == truth
    assert [len(c) for c in chunks] == [14, 14, 13]
    by_index = dict(zip(indices.tolist(), gamma.tolist()))
    # every pair of a chunk is at least as easy as every pair of the next
    for a, b in zip(chunks, chunks[1:]):
        assert min(by_index[i] for i in a) >= max(by_index[i] for i in b)


@pytest.mark.parametrize("n, steps", [(7, 7), (10, 3), (101, 4), (5, 2), (64, 5)])
def test_pair_strategies_cut_near_equal_chunks_holding_every_pair_once(n, steps):
    rng = np.random.default_rng(n * 31 + steps)
    indices = rng.permutation(3 * n)[:n]
    gamma = rng.standard_normal(n)
    for chunks in (
        partition_easy_to_hard_pairs(pair_indices=indices, gamma=gamma, steps=steps),
        partition_random(pair_indices=indices, steps=steps, seed=5),
    ):
        sizes = [len(c) for c in chunks]
        assert len(chunks) == steps
        assert max(sizes) - min(sizes) <= 1
        assert sizes == sorted(sizes, reverse=True)
        assert sorted(i for c in chunks for i in c) == sorted(indices.tolist())


def test_random_is_reproducible_for_a_seed_and_differs_across_seeds_and_from_sorted():
    rng = np.random.default_rng(6)
    n = 57
    indices = rng.permutation(500)[:n]
    gamma = rng.standard_normal(n)
    a = partition_random(pair_indices=indices, steps=3, seed=11)
    assert a == partition_random(pair_indices=indices, steps=3, seed=11)
    assert a != partition_random(pair_indices=indices, steps=3, seed=12)
    assert a != partition_easy_to_hard_pairs(pair_indices=indices, gamma=gamma, steps=3)
    assert [i for c in a for i in c] != sorted(indices.tolist())
    # depends on the set of pairs and the seed only, not on the order they arrive in
    shuffled = rng.permutation(indices)
    assert a == partition_random(pair_indices=shuffled, steps=3, seed=11)


def test_random_mixes_sources():
    data = build_sources({"x": (40, 20), "y": (40, 20)}, seed=7)
    chunks = partition_random(**data, steps=2, seed=0)
    report = describe_partition("random", chunks, **data, seed=0)
    assert all(len(c.sources) == 2 for c in report.chunks)


def test_given_keeps_the_users_source_order():
    data = build_sources(THREE, seed=8)
    order = ["medium", "easy", "hard"]
    assert partition_given(**data, steps=3, source_order=order) == [
        indices_of(data, s) for s in order
    ]


def test_given_with_steps_unequal_to_sources_raises():
    data = build_sources(THREE, seed=9)
    with pytest.raises(ValueError, match='"given" makes one chunk per data source'):
        partition_given(**data, steps=2, source_order=list(THREE))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_one_step_is_one_chunk_with_every_pair_for_every_strategy(strategy):
    data = build_sources(THREE, seed=10)
    chunks = partition_pairs(strategy, **data, steps=1, source_order=list(THREE), seed=3)
    assert chunks == [data["pair_indices"].tolist()]


def test_partition_pairs_dispatches_to_the_named_strategy():
    data = build_sources(THREE, seed=11)
    order = list(THREE)
    kw = dict(**data, steps=3, source_order=order)
    assert partition_pairs("easy_to_hard", **kw) == partition_easy_to_hard(**kw)
    assert partition_pairs("easy_to_hard_pairs", **kw) == partition_easy_to_hard_pairs(**kw)
    assert partition_pairs("given", **kw) == partition_given(**kw)
    assert partition_pairs("random", **kw, seed=4) == partition_random(**kw, seed=4)


def test_torch_inputs_are_accepted():
    data = build_sources(THREE, seed=12)
    as_torch = dict(
        pairs_sources=data["pairs_sources"],
        pair_indices=torch.as_tensor(data["pair_indices"]),
        gamma=torch.as_tensor(data["gamma"]),
    )
    assert partition_pairs("easy_to_hard", **as_torch, steps=3) == partition_pairs(
        "easy_to_hard", **data, steps=3
    )


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(strategy="hardest_first"), "unknown sdpo.partition 'hardest_first'"),
        (dict(steps=0), "positive integer"),
        (dict(steps=42, strategy="random"), "cannot cut 41 pairs into 42 steps"),
        (dict(source_order=["hard", "easy"]), r"sources \['medium'\] that are not in"),
        (dict(source_order=["hard", "medium", "easy", "extra"]), r"\['extra'\] have no pairs"),
        (dict(nan_at=5), "gamma is not finite for pair indices"),
        (dict(duplicate=True), "pair_indices must be unique"),
        (dict(short_gamma=True), "one entry per pair"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, message):
    data = build_sources(THREE, seed=13)
    strategy = change.pop("strategy", "easy_to_hard")
    kw = dict(**data, steps=3, source_order=list(THREE), seed=0)
    if "nan_at" in change:
        kw["gamma"] = kw["gamma"].copy()
        kw["gamma"][change.pop("nan_at")] = np.nan
    if change.pop("duplicate", False):
        kw["pair_indices"] = kw["pair_indices"].copy()
        kw["pair_indices"][1] = kw["pair_indices"][0]
    if change.pop("short_gamma", False):
        kw["gamma"] = kw["gamma"][:-1]
    kw.update(change)
    with pytest.raises(ValueError, match=message):
        partition_pairs(strategy, **kw)


def test_report_gives_source_composition_and_difficulty_against_float64_truth():
    data = build_sources(THREE, seed=14)
    chunks = partition_easy_to_hard(**data, steps=3, source_order=list(THREE))
    report = describe_partition("easy_to_hard", chunks, **data, source_order=list(THREE))
    assert report.steps == 3 and report.seed is None
    assert report.source_reward_accuracy == pytest.approx(
        {"hard": 3 / 13, "medium": 9 / 17, "easy": 10 / 11}, abs=1e-15
    )
    assert report.source_num_pairs == {"hard": 13, "medium": 17, "easy": 11}
    g64 = dict(zip(data["pair_indices"].tolist(), data["gamma"].astype(np.float64).tolist()))
    for t, (summary, chunk, source) in enumerate(
        zip(report.chunks, chunks, ("easy", "medium", "hard")), start=1
    ):
        assert summary.step == t
        assert summary.sources == {source: len(chunk)}
        assert summary.num_pairs == len(chunk)
        assert summary.mean_gamma == pytest.approx(np.mean([g64[i] for i in chunk]), rel=1e-12)
        assert summary.reward_accuracy == pytest.approx(np.mean([g64[i] > 0 for i in chunk]))
    text = report.format()
    assert "easy_to_hard" in text and f"{10 / 11:6.3f}" in text and "step 3: 13 pairs" in text
    assert report.to_dict()["chunks"][0]["sources"] == {"easy": 11}


def test_report_rejects_a_chunk_with_an_unknown_pair():
    data = build_sources(THREE, seed=15)
    with pytest.raises(ValueError, match="chunk 2 holds pair index -1"):
        describe_partition("given", [[int(data["pair_indices"][0])], [-1]], **data)


def test_report_over_the_pairs_the_initial_model_scored():
    data = build_sources(THREE, seed=16)
    order = ["easy", "medium", "hard"]
    chunks = partition_pairs("given", **{**data, "gamma": None}, steps=3, source_order=order)
    unscored = [*chunks[1], *chunks[2][:5]]  # chunk 1 whole, 5 of chunk 3's 13 pairs scored
    gamma = np.asarray(data["gamma"], dtype=np.float64).copy()
    gamma[np.isin(data["pair_indices"], unscored)] = np.nan  # never read
    report = describe_partition(
        "given", chunks, **{**data, "gamma": gamma}, source_order=order, unscored=unscored
    )
    full = describe_partition("given", chunks, **data, source_order=order)
    assert report.chunks[0] == full.chunks[0]
    assert report.chunks[1].reward_accuracy is None and report.chunks[1].mean_gamma is None
    assert report.chunks[1].num_pairs == 17
    pos = np.isin(data["pair_indices"], chunks[2][5:])
    truth = np.asarray(data["gamma"], dtype=np.float64)[pos]
    assert report.chunks[2].reward_accuracy == pytest.approx(np.mean(truth > 0), abs=0)
    assert report.chunks[2].mean_gamma == pytest.approx(truth.mean(), rel=1e-12)
    assert report.source_reward_accuracy["medium"] is None
    assert report.source_reward_accuracy["easy"] == full.source_reward_accuracy["easy"]
    text = report.format()
    assert "step 2: 17 pairs, not scored by the initial model" in text
    # a pair that was scored must still have a finite gamma
    gamma[np.isin(data["pair_indices"], chunks[0][:1])] = np.inf
    with pytest.raises(ValueError, match="gamma is not finite"):
        describe_partition("given", chunks, **{**data, "gamma": gamma}, unscored=unscored)
    with pytest.raises(ValueError, match="ranks by the initial model's gamma"):
        partition_pairs("easy_to_hard", **{**data, "gamma": None}, steps=3)


def test_split_held_out_is_a_seeded_order_keeping_train_test_split():
    pairs = [f"pair{i}" for i in range(23)]
    kept, held = split_held_out(pairs, fraction=0.2, seed=5)
    assert len(held) == 5 and len(kept) == 18  # round(0.2 * 23)
    assert sorted(kept + held) == sorted(pairs)
    assert kept == [p for p in pairs if p in kept] and held == [p for p in pairs if p in held]
    assert split_held_out(pairs, fraction=0.2, seed=5) == (kept, held)
    assert split_held_out(pairs, fraction=0.2, seed=6)[1] != held
    assert len(split_held_out(pairs, fraction=0.001, seed=0)[1]) == 1  # at least one pair
    with pytest.raises(ValueError, match="leave none to train on"):
        split_held_out(pairs[:1], fraction=0.5, seed=0)
