"""Packed batches: exact layout on a hand-made example, the log-prob convention against an
unpacked float64 computation, and token-budget batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdpo.engine.packing import (
    PackedBatch,
    TokenizedPair,
    batch_by_token_budget,
    check_token_ids,
    head_rows,
    pack_pairs,
    pack_pairs_shared,
)


def random_pairs(rng: np.random.Generator, n: int, *, vocab: int = 97, max_len: int = 13):
    pairs = []
    for i in range(n):
        lp, lc, lr = rng.integers(1, max_len, size=3)
        pairs.append(
            TokenizedPair(
                index=int(rng.integers(0, 10_000)) if i % 2 else i,
                prompt_ids=rng.integers(0, vocab, size=lp).tolist(),
                chosen_ids=rng.integers(0, vocab, size=lc).tolist(),
                rejected_ids=rng.integers(0, vocab, size=lr).tolist(),
                source=f"s{i % 3}",
            )
        )
    return pairs


def test_pack_pairs_hand_made_example_is_exact():
    pairs = [
        TokenizedPair(index=7, prompt_ids=[5, 6], chosen_ids=[7, 2], rejected_ids=[8, 9, 2]),
        TokenizedPair(index=3, prompt_ids=[10], chosen_ids=[11, 2], rejected_ids=[2]),
    ]
    b = pack_pairs(pairs)
    # seq 0: 5 6 | 7 2    seq 1: 5 6 | 8 9 2    seq 2: 10 | 11 2    seq 3: 10 | 2
    assert b.input_ids.tolist() == [5, 6, 7, 2, 5, 6, 8, 9, 2, 10, 11, 2, 10, 2]
    assert b.labels.tolist() == [-100, 7, 2, -100, -100, 8, 9, 2, -100, 11, 2, -100, 2, -100]
    assert b.position_ids.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 1, 2, 0, 1]
    assert b.seq_ids.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 3, 3]
    assert b.cu_seqlens.tolist() == [0, 4, 9, 12, 14]
    assert b.cu_seqlens.dtype == torch.int32
    assert b.max_seqlen == 5
    assert b.pair_indices.tolist() == [7, 3]
    assert b.completion_tokens.tolist() == [2, 3, 2, 1]
    assert (b.num_pairs, b.num_seqs, b.num_tokens) == (2, 4, 14)
    for t in (b.input_ids, b.labels, b.position_ids, b.seq_ids, b.pair_indices):
        assert t.dtype == torch.int64


def test_packed_label_sum_equals_unpacked_completion_logprob_in_float64():
    rng = np.random.default_rng(2024)
    vocab = 131
    pairs = random_pairs(rng, 7, vocab=vocab)
    b = pack_pairs(pairs)
    # one random "model": log p(next | token) depends on (position's token, position) through a
    # fresh random table, so any misalignment of labels changes the sums
    table = torch.from_numpy(rng.standard_normal((vocab, 17, vocab)))  # float64
    logp = torch.log_softmax(table, dim=-1)

    def score(token: torch.Tensor, pos: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
        return logp[token, pos % 17, nxt]

    mask = b.labels != -100
    per_token = torch.zeros(b.num_tokens, dtype=torch.float64)
    per_token[mask] = score(b.input_ids[mask], b.position_ids[mask], b.labels[mask])
    packed = torch.zeros(b.num_seqs, dtype=torch.float64).index_add_(0, b.seq_ids, per_token)

    expected = []
    for p in pairs:
        for completion in (p.chosen_ids, p.rejected_ids):
            seq = torch.tensor(p.prompt_ids + completion)
            start = len(p.prompt_ids)
            total = torch.zeros((), dtype=torch.float64)
            for j in range(start, len(seq)):  # token j predicted from position j-1
                total += score(seq[j - 1], torch.tensor(j - 1), seq[j])
            expected.append(total)
    torch.testing.assert_close(packed, torch.stack(expected), rtol=0, atol=1e-12)
    lengths = [len(c) for p in pairs for c in (p.chosen_ids, p.rejected_ids)]
    assert b.completion_tokens.tolist() == lengths
    assert int(mask.sum()) == sum(lengths)


def test_pack_pairs_keeps_pair_sequences_adjacent_and_positions_restart():
    rng = np.random.default_rng(11)
    pairs = random_pairs(rng, 9)
    b = pack_pairs(pairs)
    cu = b.cu_seqlens.long()
    for p_i, p in enumerate(pairs):
        for k, completion in enumerate((p.chosen_ids, p.rejected_ids)):
            s = 2 * p_i + k
            seq = b.input_ids[cu[s] : cu[s + 1]].tolist()
            assert seq == p.prompt_ids + completion
            assert b.position_ids[cu[s] : cu[s + 1]].tolist() == list(range(len(seq)))
            assert set(b.seq_ids[cu[s] : cu[s + 1]].tolist()) == {s}
    assert b.max_seqlen == int((cu[1:] - cu[:-1]).max())


def test_pack_pairs_refuses_empty_prompt_completion_and_batch():
    with pytest.raises(ValueError, match="pair 4 has an empty prompt"):
        pack_pairs([TokenizedPair(index=4, prompt_ids=[], chosen_ids=[1], rejected_ids=[2])])
    with pytest.raises(ValueError, match="pair 5 has an empty rejected"):
        pack_pairs([TokenizedPair(index=5, prompt_ids=[1], chosen_ids=[1], rejected_ids=[])])
    with pytest.raises(ValueError, match="no pairs"):
        pack_pairs([])


def test_hand_built_pairs_take_tensor_and_array_ids_and_name_anything_else():
    """A tokenizer's tensors or NumPy ids (and a NumPy index) become the lists and ints the
    packer reads, so they pack as the lists do; they failed with "Boolean value of Tensor ...
    is ambiguous" at the first batch. A string, a (1, T) batch or float ids are named."""
    listed = TokenizedPair(index=3, prompt_ids=[5, 6], chosen_ids=[7, 8, 2], rejected_ids=[9, 2])
    given = TokenizedPair(
        index=np.int64(3),
        prompt_ids=torch.tensor([5, 6]),
        chosen_ids=np.array([7, 8, 2], dtype=np.int32),
        rejected_ids=(9, 2),
    )
    assert given == listed and type(given.index) is int and type(given.chosen_ids[0]) is int
    for name in ("input_ids", "labels", "seq_ids", "cu_seqlens"):
        assert torch.equal(getattr(pack_pairs([given]), name), getattr(pack_pairs([listed]), name))
    cases = [
        (dict(chosen_ids="hello"), r"pair 3: chosen_ids must be a list of int token ids, got str"),
        (dict(prompt_ids=torch.tensor([[5, 6]])), r"pair 3: prompt_ids must be 1-D .* \(1, 2\)"),
        (dict(rejected_ids=np.array([9.0, 2.0])), r"rejected_ids must be integer .*float64"),
        (dict(index="3"), r"TokenizedPair.index must be an int, got str"),
    ]
    for change, message in cases:
        fields = dict(index=3, prompt_ids=[5, 6], chosen_ids=[7, 8, 2], rejected_ids=[9, 2])
        with pytest.raises(TypeError, match=message):
            TokenizedPair(**{**fields, **change})


def test_a_float_inside_an_id_list_is_named_by_both_packers_not_truncated():
    """Id lists are taken unscanned; a float inside one was truncated (2.5 packed as token 2).
    Both packers name the pair, field and position; whole ints of any int64 size pack
    exactly (a NumPy int among them too)."""
    good = TokenizedPair(index=1, prompt_ids=[4, 5], chosen_ids=[6], rejected_ids=[7, 8])
    bad = TokenizedPair(index=9, prompt_ids=[4, 5], chosen_ids=[6], rejected_ids=[7, 8])
    bad.rejected_ids[1] = 8.5  # a list is taken as it is: no per-id scan on construction
    for pack in (pack_pairs, pack_pairs_shared):
        with pytest.raises(TypeError, match=r"pair 9: rejected_ids\[1\] is 8\.5, a float"):
            pack([good, bad])
    big = TokenizedPair(
        index=2, prompt_ids=[2**62 + 1, np.int64(-3)], chosen_ids=[2**53 + 1], rejected_ids=[0]
    )
    assert pack_pairs([big]).input_ids.tolist() == [2**62 + 1, -3, 2**53 + 1] + [2**62 + 1, -3, 0]
    assert pack_pairs_shared([big]).input_ids.tolist() == [2**62 + 1, -3, 2**53 + 1, 0]


def test_every_way_in_for_token_ids_names_a_float_or_bool_id_by_pair_field_and_position():
    """fit / run_sdpo / score_pairs (``check_token_ids``), ``data_fingerprint``, the token
    cache and the packers took a float or a bool inside an id list: the check by min and max
    let both through (a float was refused only when its batch was packed), the int32 walks
    truncated 8.5 to 8, and every walk read True as 1. Each is named by pair, field and
    position; a float tensor set as a field after the pair was built is named too; NumPy and
    0-d tensor ints still pass, giving what plain ints give."""
    from sdpo.cache import data_fingerprint
    from sdpo.engine import token_cache

    ways_in = {
        "check": lambda pairs: check_token_ids(pairs, vocab_size=97),
        "check, no vocabulary": check_token_ids,
        "data_fingerprint": data_fingerprint,
        "token cache": lambda pairs: token_cache.pack_pairs(pairs, {}),
        "pack_pairs": pack_pairs,
        "pack_pairs_shared": pack_pairs_shared,
    }
    rng = np.random.default_rng(5)
    bad_values = [
        (8.5, r"is 8\.5, a float; token ids must be ints \(a float is refused, not truncated\)"),
        (np.float64(3.0), r"is np\.float64\(3\.0\), a float64; .* int\(\) of each"),
        (torch.tensor(2.0), r"is tensor\(2\.\), a Tensor; .*not truncated"),
        (True, r"is True, a bool; token ids must be ints \(it would be read as token 1\)"),
        (torch.tensor(False), r"is tensor\(False\), a bool; .*read as token 0"),
        (None, r"is None, a NoneType; token ids must be ints: give the token ids themselves"),
    ]
    for value, message in bad_values:
        for field in ("prompt_ids", "chosen_ids", "rejected_ids"):
            pairs = random_pairs(rng, 5)
            getattr(pairs[3], field)[1:2] = [value]  # lists are taken as they are
            for way_in in ways_in.values():
                with pytest.raises(
                    TypeError, match=rf"pair {pairs[3].index}: {field}\[1\] {message}"
                ):
                    way_in(pairs)
    pairs = random_pairs(rng, 3)
    pairs[2].chosen_ids = torch.tensor([4.0, 5.0])  # a field set after the pair was built
    for way_in in ways_in.values():
        with pytest.raises(TypeError, match=r"chosen_ids must be integer token ids, .*float32"):
            way_in(pairs)
    plain = random_pairs(rng, 4)
    plain[1].prompt_ids[:2] = [0, 1]  # the values a bool takes, as ints
    given = [TokenizedPair(**{**vars(p), "prompt_ids": list(p.prompt_ids)}) for p in plain]
    given[1].prompt_ids[0] = np.int64(0)
    given[2].chosen_ids[0] = torch.tensor(plain[2].chosen_ids[0])
    given[3].rejected_ids = torch.tensor(plain[3].rejected_ids)
    check_token_ids(given, vocab_size=97)
    assert data_fingerprint(given) == data_fingerprint(plain)
    got, want = token_cache.pack_pairs(given, {})[0], token_cache.pack_pairs(plain, {})[0]
    assert all(np.array_equal(got[k], want[k]) for k in want)
    for pack in (pack_pairs, pack_pairs_shared):
        assert torch.equal(pack(given).input_ids, pack(plain).input_ids)


def test_packed_batch_to_moves_every_tensor():
    pairs = random_pairs(np.random.default_rng(3), 3)
    b = pack_pairs(pairs).to("meta")
    assert isinstance(b, PackedBatch)
    for name in ("input_ids", "position_ids", "labels", "seq_ids", "cu_seqlens", "pair_indices"):
        assert getattr(b, name).device.type == "meta", name
    assert b.completion_tokens.device.type == "meta"


@pytest.mark.parametrize("shuffle", [False, True])
def test_budget_batches_never_split_pairs_respect_budget_and_fill_greedily(shuffle):
    rng = np.random.default_rng(5)
    pairs = random_pairs(rng, 53, max_len=29)
    budget = 157
    batches = batch_by_token_budget(pairs, max_tokens=budget, shuffle=shuffle, seed=9)
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(len(pairs)))  # every pair exactly once, never split
    if not shuffle:
        assert flat == list(range(len(pairs)))  # data order kept
    else:
        assert flat != list(range(len(pairs)))
        assert flat == batch_flat(
            batch_by_token_budget(pairs, max_tokens=budget, shuffle=True, seed=9)
        )
        assert flat != batch_flat(
            batch_by_token_budget(pairs, max_tokens=budget, shuffle=True, seed=10)
        )
    for b_i, batch in enumerate(batches):
        used = sum(pairs[i].num_tokens for i in batch)
        assert used <= budget
        assert used == pack_pairs([pairs[i] for i in batch]).num_tokens
        if b_i + 1 < len(batches):  # next-fit: the next pair would not have fitted
            assert used + pairs[batches[b_i + 1][0]].num_tokens > budget


def batch_flat(batches: list[list[int]]) -> list[int]:
    return [i for batch in batches for i in batch]


def test_budget_batching_names_the_pair_over_budget_and_the_fix():
    pairs = [
        TokenizedPair(index=10, prompt_ids=[1, 2], chosen_ids=[3], rejected_ids=[4]),
        TokenizedPair(index=42, prompt_ids=[1, 2, 3], chosen_ids=[3, 4], rejected_ids=[4]),
    ]
    assert batch_by_token_budget(pairs[:1], max_tokens=6) == [[0]]
    with pytest.raises(ValueError) as info:
        batch_by_token_budget(pairs, max_tokens=6)
    msg = str(info.value)
    assert "position 1" in msg and "data index 42" in msg and "9 tokens" in msg
    assert "max_tokens_per_batch" in msg and "max_length" in msg


def test_head_rows_are_exactly_the_labelled_rows_with_per_pair_counts():
    pairs = random_pairs(np.random.default_rng(21), 7)
    batch = pack_pairs(pairs)
    head = head_rows(batch)
    labelled = (batch.labels != -100).nonzero().squeeze(1)
    assert torch.equal(head.index, labelled)
    assert torch.equal(head.labels, batch.labels[labelled])
    assert torch.equal(head.seq_ids, batch.seq_ids[labelled])
    # every completion token is predicted by exactly one row of its own sequence
    assert head.pair_tokens == [len(p.chosen_ids) + len(p.rejected_ids) for p in pairs]
    for s in range(batch.num_seqs):
        pair = pairs[s // 2]
        completion = pair.chosen_ids if s % 2 == 0 else pair.rejected_ids
        assert head.labels[head.seq_ids == s].tolist() == completion


def test_both_packers_equal_a_token_by_token_build_on_odd_sized_pairs():
    # odd sizes: one-token prompts and completions, long ones, ids up to the int32 limit, and
    # id lists given as tuples; the packers gather ids in C, this builds them one by one
    rng = np.random.default_rng(131)
    pairs = []
    for i in range(37):
        lp, lc, lr = (int(x) for x in rng.choice([1, 2, 7, 129], size=3))
        ids = rng.integers(0, 2**31 - 1, size=lp + lc + lr).tolist()
        pairs.append(
            TokenizedPair(
                index=3 * i + 1,
                prompt_ids=ids[:lp],
                chosen_ids=tuple(ids[lp : lp + lc]),
                rejected_ids=ids[lp + lc :],
            )
        )
    stream, labels, shared_stream, shared_labels = [], [], [], []
    for p in pairs:
        for completion in (p.chosen_ids, p.rejected_ids):
            seq = [*p.prompt_ids, *completion]
            stream += seq
            scored = [j + 1 >= len(p.prompt_ids) for j in range(len(seq) - 1)] + [False]
            labels += [seq[j + 1] if s else -100 for j, s in enumerate(scored)]
            shared_labels += list(completion)
        shared_stream += [*p.prompt_ids, *p.chosen_ids, *p.rejected_ids]
    plain = pack_pairs(pairs)
    assert plain.input_ids.tolist() == stream
    assert plain.labels.tolist() == labels
    head = head_rows(plain)
    assert head.labels.tolist() == shared_labels
    shared = pack_pairs_shared(pairs)
    assert shared.input_ids.tolist() == shared_stream
    assert shared.labels.tolist() == shared_labels
    for t in (plain.input_ids, plain.labels, shared.input_ids, shared.labels):
        assert t.dtype == torch.int64


def test_reference_rows_follow_the_table_and_refuse_indices_it_does_not_hold():
    from sdpo.engine.scoring import PairLogps

    gen = torch.Generator().manual_seed(7)
    indices = torch.randperm(1013, generator=gen)[:601] * 3 + 2  # sparse, odd-sized, shuffled
    n = len(indices)
    ref = PairLogps(
        pair_indices=indices,
        chosen_logps=torch.randn(n, generator=gen),
        rejected_logps=torch.randn(n, generator=gen),
        chosen_tokens=torch.ones(n, dtype=torch.int64),
        rejected_tokens=torch.ones(n, dtype=torch.int64),
    )
    row_of = {int(k): i for i, k in enumerate(indices)}
    for size in (1, 5, 37):
        query = indices[torch.randint(0, n, (size,), generator=gen)]
        assert ref.rows_for(query).tolist() == [row_of[int(k)] for k in query]
    # an index absent from the table, above its largest, or negative (which would wrap around
    # a lookup table to another pair's row) is an error
    for bad in (0, int(indices.max()) + 1, -1):
        with pytest.raises(KeyError, match=f"pairs \\[{bad}\\]"):
            ref.rows_for(torch.tensor([int(indices[0]), bad]))
    # the table's indices changed in place, or replaced: lookups follow
    top = int(indices.max())
    ref.pair_indices[0] = top + 5
    assert ref.rows_for(torch.tensor([top + 5])).tolist() == [0]
    ref.pair_indices = torch.arange(n).flip(0)
    assert ref.rows_for(torch.tensor([0, n - 1])).tolist() == [n - 1, 0]
