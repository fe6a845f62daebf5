"""The reference log-prob cache: exact round trips, keys, damage detection, atomic writes and
fingerprints, on real safetensors files."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct

import numpy as np
import pytest
import safetensors.torch
import torch

from sdpo.cache import (
    CACHE_FORMAT_VERSION,
    CacheKey,
    RefLogprobCache,
    RefValues,
    data_fingerprint,
    file_fingerprint,
)
from sdpo.engine.packing import TokenizedPair
from sdpo.engine.tiny import build_tokenizer


def random_values(num_pairs: int, *, seed: int) -> RefValues:
    g = torch.Generator().manual_seed(seed)
    return RefValues(
        pair_indices=torch.randperm(5 * num_pairs, generator=g)[:num_pairs],
        chosen_logps=-torch.rand(num_pairs, generator=g) * 200,
        rejected_logps=-torch.rand(num_pairs, generator=g) * 200,
        chosen_tokens=torch.randint(1, 500, (num_pairs,), generator=g),
        rejected_tokens=torch.randint(1, 500, (num_pairs,), generator=g),
    )


def make_key(**changes) -> CacheKey:
    key = CacheKey(
        model_fingerprint=hashlib.sha256(b"model").hexdigest(),
        data_fingerprint=hashlib.sha256(b"data").hexdigest(),
        tokenizer_fingerprint=hashlib.sha256(b"tok").hexdigest(),
        max_length=1024,
        max_prompt_length=512,
        truncation="keep_end",
        dtype_policy="fp32",
        kernels_impl="torch",
    )
    return dataclasses.replace(key, **changes)


def assert_same_values(a: RefValues, b: RefValues) -> None:
    for name, t in a.tensors().items():
        u = getattr(b, name)
        assert t.dtype == u.dtype, name
        assert torch.equal(t, u), name


def data_region(path) -> tuple[int, int]:
    """(start, end) byte offsets of the tensor data in a safetensors file."""
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return 8 + n, len(blob)


@pytest.fixture
def saved(tmp_path):
    values = random_values(37, seed=1)
    cache = RefLogprobCache(tmp_path / "step-1" / "ref_logps.safetensors")
    cache.save(values, make_key())
    return cache, values


def test_round_trip_gives_the_exact_tensors(saved):
    cache, values = saved
    loaded, reason = cache.load(make_key())
    assert reason == "ok"
    assert loaded is not None
    assert_same_values(values, loaded)


def test_cache_file_is_plain_safetensors_with_key_checksum_and_version(saved):
    cache, values = saved
    with safetensors.safe_open(cache.path, framework="pt") as f:
        meta = f.metadata()
        assert torch.equal(f.get_tensor("chosen_logps"), values.chosen_logps)
    assert meta["sdpo_ref_cache_version"] == CACHE_FORMAT_VERSION == "2"
    assert len(meta["tensors_sha256"]) == 64
    assert json.loads(meta["key.max_length"]) == 1024
    assert json.loads(meta["key.truncation"]) == "keep_end"


def test_missing_file_reason_is_missing(tmp_path):
    values, reason = RefLogprobCache(tmp_path / "nothing.safetensors").load(make_key())
    assert values is None
    assert reason == "missing"


@pytest.mark.parametrize(
    "field, new",
    [
        ("model_fingerprint", hashlib.sha256(b"other model").hexdigest()),
        ("data_fingerprint", hashlib.sha256(b"other data").hexdigest()),
        ("tokenizer_fingerprint", hashlib.sha256(b"other tok").hexdigest()),
        ("max_length", 1023),
        ("max_prompt_length", None),
        ("truncation", "keep_start"),
        ("dtype_policy", "bf16"),
        ("kernels_impl", "triton"),
        ("sharded_bf16_params", True),
    ],
)
def test_key_mismatch_reason_names_the_field(saved, field, new):
    cache, _ = saved
    values, reason = cache.load(make_key(**{field: new}))
    assert values is None
    assert reason.startswith(f"key mismatch: {field} differs"), reason


def test_key_mismatch_reason_shows_short_cached_and_current_values(saved):
    cache, _ = saved
    now = hashlib.sha256(b"other model").hexdigest()
    _, reason = cache.load(make_key(model_fingerprint=now))
    was = hashlib.sha256(b"model").hexdigest()
    assert (
        reason == f"key mismatch: model_fingerprint differs (cached {was[:12]}…, now {now[:12]}…)"
    )


def test_key_digest_is_stable_and_changes_with_any_field():
    assert make_key().digest() == make_key().digest()
    digests = {make_key().digest()}
    for field, new in [("max_length", 7), ("dtype_policy", "bf16"), ("max_prompt_length", None)]:
        digests.add(make_key(**{field: new}).digest())
    assert len(digests) == 4


def test_ld_alpha_one_and_unset_give_one_key_and_the_same_file_is_accepted(tmp_path):
    """ld_alpha = 1 weighs every token 1, the plain sums bit for bit: a key built with it by
    hand (as the runner's is not) equals the unset one, in its fields, its digest and the
    file it accepts; a NumPy or integer spelling of a number gives that number's key."""
    plain, one = make_key(), make_key(ld_alpha=1)
    assert one == plain == make_key(ld_alpha=1.0) and one.digest() == plain.digest()
    assert "ld_alpha" not in one.fields()
    assert make_key(ld_alpha=np.float64(0.5)).digest() == make_key(ld_alpha=0.5).digest()
    assert make_key(ld_alpha=0).digest() == make_key(ld_alpha=0.0).digest()
    values = random_values(5, seed=12)
    cache = RefLogprobCache(tmp_path / "ref.safetensors")
    cache.save(values, one)
    assert cache.load(plain)[1] == "ok"
    cache.save(values, make_key(ld_alpha=0.5))
    assert cache.load(one)[1] == "key mismatch: ld_alpha differs (cached 0.5, now unset)"
    with pytest.raises(ValueError, match=r"ld_alpha must be None \(off\) or a number in \[0, 1\]"):
        make_key(ld_alpha=1.5)


def test_a_file_written_under_a_key_that_kept_ld_alpha_one_is_still_read(saved):
    """Keys built by hand with ld_alpha = 1 used to store it ("key.ld_alpha": "1"); those files
    hold the plain sums, so the normalised key reads them (ld_alpha = 0.5 still does not)."""
    cache, values = saved
    blob = cache.path.read_bytes()
    tensors = safetensors.torch.load(blob)
    with safetensors.safe_open(cache.path, framework="pt") as f:
        meta = f.metadata()
    for stored in ("1", "1.0", "0.5"):
        cache.path.write_bytes(
            safetensors.torch.save(tensors, metadata={**meta, "key.ld_alpha": stored})
        )
        loaded, reason = cache.load(make_key(ld_alpha=1))
        if stored == "0.5":
            assert loaded is None and reason.startswith("key mismatch: ld_alpha"), reason
        else:
            assert reason == "ok"
            assert_same_values(values, loaded)


def test_cache_arguments_of_the_wrong_type_are_named(saved):
    """A scoring result saved as it is, save's arguments swapped, a dict for a key, a dtype for
    dtype_policy, a string length: each named (they were AttributeErrors from inside, a json
    error at save, or a key that never matched its file)."""
    from sdpo.engine.scoring import PairLogps

    cache, values = saved
    with pytest.raises(TypeError, match=r"values must be a sdpo\.cache\.RefValues, got PairLogps"):
        cache.save(PairLogps(**values.tensors()), make_key())
    with pytest.raises(TypeError, match="key must be a sdpo.cache.CacheKey, got RefValues"):
        cache.save(make_key(), values)
    with pytest.raises(TypeError, match="key must be a sdpo.cache.CacheKey, got dict"):
        cache.load(make_key().fields())
    with pytest.raises(TypeError, match=r"CacheKey\.dtype_policy must be a str, got dtype"):
        make_key(dtype_policy=torch.bfloat16)
    with pytest.raises(TypeError, match=r"CacheKey\.max_length must be an int, got str '1024'"):
        make_key(max_length="1024")
    assert make_key(max_length=np.int64(1024)) == make_key()  # a NumPy int is the same key
    assert cache.load(make_key(max_length=np.int64(1024)))[1] == "ok"


def test_flipped_byte_in_tensor_data_is_a_checksum_mismatch_not_an_error(saved):
    cache, _ = saved
    start, end = data_region(cache.path)
    good = cache.path.read_bytes()
    rng = np.random.default_rng(2)
    positions = {start, end - 1, *rng.integers(start, end, size=40).tolist()}
    for pos in positions:
        bad = bytearray(good)
        bad[pos] ^= 1 << int(rng.integers(0, 8))
        cache.path.write_bytes(bytes(bad))
        values, reason = cache.load(make_key())
        assert values is None, pos
        assert reason == "checksum mismatch (file damaged)", (pos, reason)


def test_flipped_byte_in_header_is_rejected_not_raised(saved):
    cache, _ = saved
    start, _ = data_region(cache.path)
    good = cache.path.read_bytes()
    for pos in range(start):  # every byte of the length prefix and the JSON header
        bad = bytearray(good)
        bad[pos] ^= 0x01
        cache.path.write_bytes(bytes(bad))
        values, reason = cache.load(make_key())
        assert values is None, (pos, reason)
        assert reason != "ok"


@pytest.mark.parametrize("keep", ["empty", "prefix", "half header", "all but one byte"])
def test_truncated_file_reason_is_unreadable(saved, keep):
    cache, _ = saved
    good = cache.path.read_bytes()
    start, end = data_region(cache.path)
    cut = {"empty": 0, "prefix": 5, "half header": start // 2, "all but one byte": end - 1}[keep]
    cache.path.write_bytes(good[:cut])
    values, reason = cache.load(make_key())
    assert values is None
    assert reason.startswith("unreadable: "), reason


def test_failed_write_leaves_the_old_file_intact(saved, monkeypatch):
    cache, old = saved
    before = cache.path.read_bytes()

    def failing_save(*args, **kwargs):
        raise RuntimeError("serialisation failed")

    monkeypatch.setattr(safetensors.torch, "save", failing_save)
    with pytest.raises(RuntimeError, match="serialisation failed"):
        cache.save(random_values(41, seed=3), make_key())
    monkeypatch.undo()

    assert cache.path.read_bytes() == before
    assert sorted(p.name for p in cache.path.parent.iterdir()) == [cache.path.name]
    loaded, reason = cache.load(make_key())
    assert reason == "ok"
    assert_same_values(old, loaded)


def test_save_overwrites_with_new_values_and_key(saved):
    cache, _ = saved
    new = random_values(19, seed=4)
    cache.save(new, make_key(dtype_policy="bf16"))
    loaded, reason = cache.load(make_key(dtype_policy="bf16"))
    assert reason == "ok"
    assert_same_values(new, loaded)
    assert cache.load(make_key())[1].startswith("key mismatch: dtype_policy")


def test_empty_values_round_trip(tmp_path):
    cache = RefLogprobCache(tmp_path / "empty.safetensors")
    cache.save(RefValues.concat([]), make_key())
    loaded, reason = cache.load(make_key())
    assert reason == "ok"
    assert loaded.num_pairs == 0


# ---------------------------------------------------------------------------------------------
# RefValues


def test_gamma_accuracy_and_mean_match_float64_truth():
    v = random_values(53, seed=5)
    c = v.chosen_logps.double().numpy()
    r = v.rejected_logps.double().numpy()
    # chosen/rejected are exact float32 values, so their float32 difference rounds the float64 one
    np.testing.assert_allclose(v.gamma.double().numpy(), c - r, rtol=0, atol=2e-5)
    assert v.reward_accuracy() == pytest.approx(np.mean(c - r > 0), abs=0)
    assert v.mean_gamma() == pytest.approx(np.mean(c - r), rel=1e-6)
    assert 0 < v.reward_accuracy() < 1


def test_subset_selects_and_reorders_by_pair_index():
    v = random_values(29, seed=6)
    rng = np.random.default_rng(6)
    want = rng.permutation(v.pair_indices.numpy())[:11]
    sub = v.subset(want.tolist())
    assert sub.pair_indices.tolist() == want.tolist()
    pos = {int(i): k for k, i in enumerate(v.pair_indices)}
    for name, t in sub.tensors().items():
        assert torch.equal(t, getattr(v, name)[[pos[int(i)] for i in want]]), name


def test_subset_of_an_unknown_pair_raises_naming_it():
    v = random_values(7, seed=7)
    absent = int(v.pair_indices.max()) + 3
    with pytest.raises(KeyError, match=str(absent)):
        v.subset([int(v.pair_indices[0]), absent])


def test_subset_names_a_pair_index_given_twice_and_where():
    """A RefValues holds each pair once, so a repeated index is refused, naming it and its
    positions (it was "RefValues.pair_indices must be unique ... Each pair must be scored
    once", as if the stored values were at fault)."""
    v = random_values(9, seed=10)
    a, b = (int(i) for i in v.pair_indices[:2])
    with pytest.raises(
        ValueError, match=rf"pair index {b} is given 2 times, at positions \[1, 3\]"
    ):
        v.subset([a, b, int(v.pair_indices[4]), b])


def test_subset_refuses_a_boolean_mask_and_fractional_indices():
    v = random_values(9, seed=11)
    mask = torch.zeros(9, dtype=torch.bool)
    mask[int(v.pair_indices.argmin())] = True  # one True: once read as pair index 1 (or 0)
    with pytest.raises(ValueError, match=r"not a boolean mask.*values\.pair_indices\[mask\]"):
        v.subset(mask)
    with pytest.raises(ValueError, match=r"integer pair indices, got \[2\.5\]"):
        v.subset(torch.tensor([2.5]))
    whole = v.pair_indices[[3, 0]]
    assert torch.equal(v.subset(whole.double()).pair_indices, whole)  # integral floats are ids
    assert torch.equal(v.subset(v.pair_indices[mask]).pair_indices, v.pair_indices[mask])


def test_concat_joins_parts_in_order_and_rejects_overlap():
    v = random_values(23, seed=8)
    a, b = v.subset(v.pair_indices[:10]), v.subset(v.pair_indices[10:])
    assert_same_values(v, RefValues.concat([a, b]))
    with pytest.raises(
        ValueError, match=rf"pair index {int(a.pair_indices[0])} is in parts \[0, 2\]"
    ):
        RefValues.concat([a, b, a])


def test_values_are_converted_to_storage_dtypes_and_shapes_checked():
    v = RefValues(
        pair_indices=[3, 1],
        chosen_logps=torch.tensor([-1.5, -2.5], dtype=torch.float64),
        rejected_logps=[-2.0, -1.0],
        chosen_tokens=[4, 5],
        rejected_tokens=[6, 7],
    )
    assert v.chosen_logps.dtype == torch.float32 and v.pair_indices.dtype == torch.int64
    assert v.gamma.tolist() == [0.5, -1.5]
    with pytest.raises(ValueError, match="one length"):
        RefValues(
            pair_indices=[1, 2],
            chosen_logps=[0.0],
            rejected_logps=[0.0, 1.0],
            chosen_tokens=[1, 1],
            rejected_tokens=[1, 1],
        )


def test_values_refuse_fractional_pair_indices_and_token_counts_as_subset_does():
    """Float pair indices were truncated (2.5 became pair 2, silently taking another pair's
    values); now construction refuses them, a boolean mask and NaN as subset() does, and
    takes whole-number floats as the ids they are."""
    logps = torch.tensor([-1.0, -2.0])

    def values(**change) -> RefValues:
        fields = dict(pair_indices=[0, 1], chosen_tokens=[3, 4], rejected_tokens=[5, 6])
        return RefValues(chosen_logps=logps, rejected_logps=logps, **{**fields, **change})

    with pytest.raises(ValueError, match=r"pair_indices takes whole-number pair indices.*\[2\.5\]"):
        values(pair_indices=torch.tensor([0.0, 2.5]))
    with pytest.raises(ValueError, match=r"pair_indices takes whole-number .*\[nan\]"):
        values(pair_indices=[float("nan"), 1.0])
    with pytest.raises(ValueError, match=r"pair_indices takes pair indices .*not a boolean mask"):
        values(pair_indices=torch.tensor([True, False]))
    with pytest.raises(ValueError, match=r"chosen_tokens takes whole-number token counts.*3\.5"):
        values(chosen_tokens=np.array([3.5, 4.0]))
    whole = values(pair_indices=torch.tensor([7.0, 2.0], dtype=torch.float64))
    assert whole.pair_indices.tolist() == [7, 2] and whole.pair_indices.dtype == torch.int64


def test_from_scores_copies_an_engine_scoring_result():
    from sdpo.engine.scoring import PairLogps  # imported here: it pulls in the kernels

    v = random_values(13, seed=9)
    scores = PairLogps(**v.tensors())
    assert_same_values(v, RefValues.from_scores(scores))
    back = v.to_pair_logps()
    assert isinstance(back, PairLogps)
    for name, t in v.tensors().items():
        assert torch.equal(getattr(back, name), t), name


# ---------------------------------------------------------------------------------------------
# Fingerprints


def random_pairs(n: int, *, seed: int) -> list[TokenizedPair]:
    rng = np.random.default_rng(seed)

    def ids(lo: int, hi: int) -> list[int]:
        return rng.integers(0, 50257, size=int(rng.integers(lo, hi))).tolist()

    return [
        TokenizedPair(
            index=i, prompt_ids=ids(1, 30), chosen_ids=ids(1, 20), rejected_ids=ids(1, 20)
        )
        for i in range(n)
    ]


def test_data_fingerprint_is_deterministic():
    assert data_fingerprint(random_pairs(23, seed=10)) == data_fingerprint(
        random_pairs(23, seed=10)
    )
    assert data_fingerprint(random_pairs(23, seed=10)) != data_fingerprint(
        random_pairs(23, seed=11)
    )


@pytest.mark.parametrize("field", ["prompt_ids", "chosen_ids", "rejected_ids"])
def test_data_fingerprint_changes_when_one_token_changes(field):
    pairs = random_pairs(23, seed=12)
    base = data_fingerprint(pairs)
    rng = np.random.default_rng(12)
    pair = pairs[int(rng.integers(0, len(pairs)))]
    ids = getattr(pair, field)
    pos = int(rng.integers(0, len(ids)))
    ids[pos] += 1
    assert data_fingerprint(pairs) != base
    ids[pos] -= 1
    assert data_fingerprint(pairs) == base


def test_data_fingerprint_sees_boundaries_indices_and_order():
    pairs = random_pairs(9, seed=13)
    base = data_fingerprint(pairs)
    # the same token stream with one token moved from the prompt into the chosen completion
    moved = [dataclasses.replace(p) for p in pairs]
    moved[4] = dataclasses.replace(
        pairs[4],
        prompt_ids=pairs[4].prompt_ids[:-1],
        chosen_ids=pairs[4].prompt_ids[-1:] + pairs[4].chosen_ids,
    )
    assert data_fingerprint(moved) != base
    reindexed = [dataclasses.replace(p, index=p.index + (p.index == 5) * 100) for p in pairs]
    assert data_fingerprint(reindexed) != base
    assert data_fingerprint(pairs[::-1]) != base
    assert data_fingerprint(pairs[:-1]) != base


def test_file_fingerprint_of_a_real_tokenizer_is_its_sha256(tmp_path):
    build_tokenizer(tmp_path, words=["alpha", "beta", "gamma"])
    path = tmp_path / "tokenizer.json"
    assert file_fingerprint(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    big = tmp_path / "big.bin"
    big.write_bytes(np.random.default_rng(14).bytes(3 * (1 << 20) + 17))  # spans read blocks
    assert file_fingerprint(big) == hashlib.sha256(big.read_bytes()).hexdigest()


def test_data_fingerprint_is_the_sha256_of_the_documented_int32_stream():
    # more pairs than one gathered group (4096), odd sizes, and a generator as input
    rng = np.random.default_rng(14)
    pairs = [
        TokenizedPair(
            index=int(rng.integers(0, 2**31 - 1)),
            prompt_ids=rng.integers(0, 2**31 - 1, size=int(rng.integers(1, 4))).tolist(),
            chosen_ids=rng.integers(0, 50257, size=int(rng.integers(1, 3))).tolist(),
            rejected_ids=rng.integers(0, 50257, size=int(rng.integers(0, 3))).tolist(),
        )
        for _ in range(4099)
    ]
    h = hashlib.sha256(b"sdpo.pairs.v1")
    for p in pairs:
        values = [p.index, len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)]
        for value in values + p.prompt_ids + p.chosen_ids + p.rejected_ids:
            h.update(struct.pack("<i", value))
    h.update(struct.pack("<Q", len(pairs)))
    assert data_fingerprint(p for p in pairs) == h.hexdigest()


def test_data_fingerprint_of_data_set_rows_names_the_row_and_what_to_pass():
    """Rows (dicts) instead of TokenizedPairs failed with "'dict' object has no attribute
    'index'"; the error names the position and the tokenized pairs to pass."""
    pair = TokenizedPair(index=0, prompt_ids=[1], chosen_ids=[2], rejected_ids=[3])
    rows = [pair, {"prompt": "2+2?", "chosen": "4", "rejected": "5"}]
    with pytest.raises(
        TypeError, match=r"pairs\[1\] is a dict .*not a TokenizedPair.*tokenize_pairs"
    ):
        data_fingerprint(rows)


def test_data_fingerprint_takes_any_int64_pair_index():
    """A caller's own 64-bit pair ids (run_sdpo takes any int64 TokenizedPair.index) get a
    fingerprint, distinct from that of the ids they share their low 32 bits with; indices within
    int32 keep the fingerprint earlier caches were keyed by."""

    def pairs(indices):
        return [
            TokenizedPair(index=i, prompt_ids=[1, 2], chosen_ids=[3], rejected_ids=[4, 5])
            for i in indices
        ]

    assert data_fingerprint(pairs([0, -7, 2**31 - 1, -(2**31)])) == (
        "a520fa0635a162fa61b74c5525a477672074166dd20177cbe84944dea59a585d"
    )
    wide = (0, 2**32, -(2**32), 2**62, 2**31, -(2**31) - 1, -(2**63))
    assert len({data_fingerprint(pairs([i])) for i in wide}) == len(wide)
    assert data_fingerprint(pairs([5, 2**40])) != data_fingerprint(pairs([2**40, 5]))
