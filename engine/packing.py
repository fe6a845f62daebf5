"""Padding-free packing of preference pairs and token-budget batching.

A batch of P pairs becomes ONE flat token stream of S = 2P sequences (chosen of pair p is
sequence 2p, rejected is 2p+1), delimited by ``cu_seqlens``. No pad token is ever computed on,
so the cost of a batch is its real token count; ``batch_by_token_budget`` groups pairs so that
each batch holds at most ``max_tokens`` tokens.

Labels are already shifted: ``labels[i]`` is the token that position i must predict when that
token is a completion token of the same sequence, else -100. Summing log p(labels[i] | prefix)
over ``labels != -100`` gives log pi(completion | prompt) of each sequence, so the loss code never
needs to know where prompts end.

Shared prompts (opt-in, ``pack_pairs_shared``): chosen and rejected share their prompt, so the
prompt can be computed once. A pair is then stored as [prompt, chosen, rejected] (P + C + R
tokens instead of 2P + C + R); the rejected tokens take positions P .. P+R-1, as if they followed
the prompt directly. Attention runs over two sequences per pair with separate query and key
layouts (see ``engine/attention.py``): queries [prompt, chosen] over the same rows, and queries
[rejected] over keys [prompt, rejected]. Only the rows that predict a completion token reach the
log-prob head: ``head_index`` gathers them into the ordinary per-sequence order (chosen of pair
p = sequence 2p, rejected = 2p+1), the last prompt row once for each completion, so the head
ops and the loss code are the same for both layouts. Token budgets are counted in unshared
tokens (``TokenizedPair.num_tokens``) in both layouts, so batches and step plans are identical
and the two modes are comparable step by step; a shared batch simply uses less memory than its
budget allows.

LD-DPO (``loss.ld_alpha``): ``head_rows(batch, ld_alpha=...)`` also gives each head row a weight
(``length_desensitized_weights``): 1 for the first min(chosen, rejected) completion tokens of
its pair, ``ld_alpha`` past them. The head ops multiply it into the per-sequence sums and their
gradients; training and scoring build it the same way, so their sums agree.
"""

from __future__ import annotations

import array
import dataclasses
import itertools
import numbers
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from sdpo.engine.attention import SharedPrefix

IGNORE_INDEX = -100


@dataclass(kw_only=True)
class TokenizedPair:
    """One preference pair as token ids (see ``sdpo.engine.tokenize`` for how they are made)."""

    index: int  # stable id: position of the pair in its data set (after reading)
    prompt_ids: list[int]
    chosen_ids: list[int]  # completion ids, EOS included (unless truncated away)
    rejected_ids: list[int]  # completion ids, EOS included (unless truncated away)
    source: str = ""  # data source name (sDPO partitions by source)
    truncated: bool = False

    def __post_init__(self) -> None:
        # pairs built by hand (the embedding API): a NumPy index or ids held as a tensor or an
        # array (a tokenizer's return_tensors output) become plain ints and lists here, as the
        # packer and the caches expect; anything else is named. Lists pass as they are, unscanned
        # (the tokenizer and the token cache build millions of pairs); a float or a bool inside
        # one is refused by every walk that takes them (check_token_ids, run by fit, run_sdpo and
        # score_pairs before any work; data_fingerprint; the token cache).
        if type(self.index) is not int:
            if isinstance(self.index, bool) or not isinstance(self.index, numbers.Integral):
                raise TypeError(
                    f"TokenizedPair.index must be an int, got {type(self.index).__qualname__} "
                    f"{self.index!r}"
                )
            self.index = int(self.index)
        for field in ("prompt_ids", "chosen_ids", "rejected_ids"):
            if type(getattr(self, field)) is not list:
                setattr(self, field, _id_list(getattr(self, field), self.index, field))

    @property
    def num_tokens(self) -> int:
        """Tokens this pair occupies in a packed batch (the prompt is stored twice)."""
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)

    @property
    def num_shared_tokens(self) -> int:
        """Tokens this pair occupies in a shared-prompt batch (the prompt is stored once)."""
        return len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


def _id_list(ids: object, index: int, field: str) -> list[int]:
    """Token ids given as a 1-D integer tensor, array, tuple or range, as a list of ints."""
    if isinstance(ids, Tensor | np.ndarray):
        if isinstance(ids, Tensor):
            integer = not (ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool)
        else:
            integer = np.issubdtype(ids.dtype, np.integer)
        if ids.ndim == 1 and integer:
            return ids.tolist()
        got = f"got a {tuple(ids.shape)} {type(ids).__qualname__} of {ids.dtype}"
        if ids.ndim != 1:
            raise TypeError(
                f"pair {index}: {field} must be 1-D integer token ids, {got} (a tokenizer's "
                "(1, T) output: take row 0)"
            )
        raise TypeError(
            f"pair {index}: {field} must be integer token ids, {got} (a float is refused, not "
            "truncated, and a bool is no token): give the token ids themselves, or "
            ".long() / .astype(np.int64) of whole-number floats"
        )
    if isinstance(ids, tuple | range) and all(
        isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in ids
    ):
        return [int(i) for i in ids]
    raise TypeError(
        f"pair {index}: {field} must be a list of int token ids, got {type(ids).__qualname__} "
        f"{str(ids)[:40]}"
    )


def check_pairs(pairs: Sequence[object], who: str) -> None:
    """Every pair a ``TokenizedPair`` (a data set's row, a dict of ``*_input_ids``, failed
    deep in the batch planner with an AttributeError), each with its own ``index``: the
    reference values are looked up by it, so two pairs sharing one (ids restarted at 0 for
    each source, say) would both get the values of one of them, silently."""
    seen: dict[int, int] = {}
    for i, p in enumerate(pairs):
        if not isinstance(p, TokenizedPair):
            raise TypeError(
                f"{who}: pairs[{i}] is a {type(p).__qualname__}, not a TokenizedPair; build the "
                "pairs with sdpo.engine.tokenize.tokenize_pairs or as TokenizedPair(index=..., "
                "prompt_ids=..., chosen_ids=..., rejected_ids=...)"
            )
        first = seen.setdefault(p.index, i)
        if first != i:
            raise ValueError(
                f"{who}: pairs[{first}] and pairs[{i}] share the index {p.index}; each pair "
                "needs its own TokenizedPair.index (the reference values are looked up by it)"
            )


@dataclass(kw_only=True)
class PackedBatch:
    """P pairs as 2P sequences in one flat stream; every tensor lives on one device."""

    input_ids: Tensor  # (N,) int64
    position_ids: Tensor  # (N,) int64, restart at 0 in every sequence
    labels: Tensor  # (N,) int64, -100 = not scored
    seq_ids: Tensor  # (N,) int64 in [0, S)
    cu_seqlens: Tensor  # (S+1,) int32
    max_seqlen: int
    pair_indices: Tensor  # (P,) int64: TokenizedPair.index of each pair
    completion_tokens: Tensor  # (S,) int64: number of labels != -100 per sequence

    @property
    def num_pairs(self) -> int:
        return int(self.pair_indices.shape[0])

    @property
    def num_seqs(self) -> int:
        return int(self.cu_seqlens.shape[0]) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> PackedBatch:
        def move(t: Tensor) -> Tensor:
            return t.to(device, non_blocking=non_blocking)

        return PackedBatch(
            input_ids=move(self.input_ids),
            position_ids=move(self.position_ids),
            labels=move(self.labels),
            seq_ids=move(self.seq_ids),
            cu_seqlens=move(self.cu_seqlens),
            max_seqlen=self.max_seqlen,
            pair_indices=move(self.pair_indices),
            completion_tokens=move(self.completion_tokens),
        )


def _check_packable(pair: TokenizedPair) -> None:
    if len(pair.prompt_ids) == 0:  # len: a tensor field has no truth value
        raise ValueError(
            f"pair {pair.index} has an empty prompt; every sequence needs at least one prompt "
            "token (tokenize with a BOS token or give the row a prompt)"
        )
    for name, completion in (("chosen", pair.chosen_ids), ("rejected", pair.rejected_ids)):
        if len(completion) == 0:
            raise ValueError(
                f"pair {pair.index} has an empty {name} completion; nothing would be scored "
                "(re-tokenize with a larger max_length)"
            )


def check_packable(pairs: Sequence[TokenizedPair]) -> None:
    """Every pair with a prompt and both completions, as ``pack_pairs`` needs them, before any
    work: the trainer met such a pair only when its micro-batch was packed, after earlier
    micro-batches' backward."""
    for pair in pairs:
        _check_packable(pair)


ID_FIELDS = ("prompt_ids", "chosen_ids", "rejected_ids")

# pairs per check_token_ids walk: a few hundred thousand ids of int64 at a time for pairs of
# a few hundred tokens, whatever the size of the data
_PAIRS_PER_CHECK = 512


def check_token_ids(pairs: Sequence[TokenizedPair], *, vocab_size: int | None = None) -> None:
    """Every token id an integer and, given ``vocab_size``, in [0, vocab_size), before any
    work: a float inside a hand-built pair's list would be refused only when its batch is
    packed (in ``fit``, after earlier updates), a bool would be read as token 0 or 1, and an
    id outside the vocabulary fails deep in the embedding lookup (an opaque index error on a
    CPU, a device-side assert on a GPU). Names the pair, field and position.

    The ids are walked once, in C (``id_array``), and the range is NumPy's min and max of the
    result, a few hundred pairs at a time: less than the ``min`` and ``max`` of each list
    that this check was, which let floats and bools through (benchmarks/RESULTS.md: 53
    against 86 ms for 4,096 pairs of 800 ids)."""
    for start in range(0, len(pairs), _PAIRS_PER_CHECK):
        group = pairs[start : start + _PAIRS_PER_CHECK]
        ids, offsets = id_array(group, fields=ID_FIELDS, typecode="q")
        if vocab_size is None or not ids.size:
            continue
        if int(ids.min()) >= 0 and int(ids.max()) < vocab_size:
            continue
        at = int(np.flatnonzero((ids < 0) | (ids >= vocab_size))[0])
        span = int(np.searchsorted(offsets, at, side="right")) - 1
        pair, field = group[span // len(ID_FIELDS)], ID_FIELDS[span % len(ID_FIELDS)]
        k = at - int(offsets[span])
        raise ValueError(
            f"pair {pair.index}: {field}[{k}] holds token id {int(ids[at])}, outside the model's "
            f"vocabulary [0, {vocab_size}); tokenize the pairs with the model's tokenizer "
            "(tokenize_pairs(..., vocab_size=...) checks this)"
        )


def id_array(
    pairs: Sequence[TokenizedPair], *, fields: Sequence[str], typecode: str
) -> tuple[np.ndarray, np.ndarray]:
    """The ids of ``fields`` of each pair back to back (pair by pair, the fields in order) as
    one array of the ``array`` module's ``typecode`` ("q": int64, "i": int32), and the
    offsets of the lists in it, (len(pairs) * len(fields) + 1,) int64.

    Each list is walked once, in C (``array.fromlist``), which refuses what is not an integer
    (a float would otherwise be truncated: 8.5 read as token 8) and an int the type cannot
    hold; the first such id is then named by pair, field and position. The walk takes a bool
    as 0 or 1, so the ids of those values, few in real data, are looked at one by one
    afterwards. A field set to a tensor or an array after the pair was built is converted
    as the constructor converts it."""
    buffer = array.array(typecode)
    add = buffer.fromlist
    lists = [getattr(p, field) for p in pairs for field in fields]
    try:
        for ids in lists:
            add(ids)
    except (TypeError, OverflowError):  # a bad id, or a field that is no list
        buffer = array.array(typecode)
        lists = [append_ids(buffer, p, field) for p in pairs for field in fields]
    lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
    offsets = np.zeros(len(lists) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    stream = np.frombuffer(buffer, dtype=np.dtype(f"i{buffer.itemsize}"))
    found = first_bool(stream, offsets[:-1], lists)
    if found is not None:
        span, k = found
        pair, field = pairs[span // len(fields)], fields[span % len(fields)]
        raise bool_id_error(pair, field, k, lists[span][k])
    return stream, offsets


def append_ids(buffer: array.array, pair: TokenizedPair, field: str) -> list:
    """``pair``'s ``field`` appended to ``buffer``; returns the ids as a list. Names the first
    id that is not an integer or that the buffer's type cannot hold."""
    ids = getattr(pair, field)
    if not isinstance(ids, list):  # set after the pair was built: converted as on construction
        ids = _id_list(ids, pair.index, field)
    try:
        buffer.fromlist(ids)
    except (TypeError, OverflowError):
        _name_non_integer_id(pair, field, ids, bits=8 * buffer.itemsize)
        raise
    return ids


def first_bool(
    stream: np.ndarray, starts: np.ndarray | Sequence[int], lists: Sequence[Sequence[object]]
) -> tuple[int, int] | None:
    """(list number, position) of the first bool among ``lists``, whose ids an
    ``array.fromlist`` walk put into ``stream`` (list i from ``stream[starts[i]]`` on; other
    words of the stream belong to no list), or None. That walk took True and False as 1 and
    0, so only the ids of those values are looked at."""
    ones = np.flatnonzero(stream.view(f"u{stream.itemsize}") <= 1)
    if not ones.size:
        return None
    starts = np.asarray(starts, dtype=np.int64)
    owners = np.searchsorted(starts, ones, side="right") - 1
    for o, k in zip(owners.tolist(), (ones - starts[owners]).tolist()):
        ids = lists[o]
        # a header word before the first list has o = -1 and k < 0; one after a list, k >= len
        if 0 <= k < len(ids) and type(ids[k]) is not int and _is_bool(ids[k]):
            return o, k
    return None


def bool_id_error(pair: TokenizedPair, field: str, k: int, value: object) -> TypeError:
    """The error for the bool ``value`` at ``field[k]`` of ``pair`` (see ``first_bool``)."""
    return TypeError(
        f"pair {pair.index}: {field}[{k}] is {value!r}, a bool; token ids must be ints (it "
        f"would be read as token {int(value)}): give the token ids themselves"
    )


def _is_bool(value: object) -> bool:
    return isinstance(value, bool | np.bool_) or (
        isinstance(value, Tensor) and value.dtype == torch.bool
    )


def _name_non_integer_id(pair: TokenizedPair, field: str, ids: list, *, bits: int) -> None:
    """The first id of ``ids`` that is not an integer (a float, None, a str) or lies outside
    a signed ``bits``-bit integer, by pair, field and position."""
    for k, i in enumerate(ids):
        try:
            value = operator.index(i)
        except TypeError:
            fix = (
                " (a float is refused, not truncated): give the token ids themselves, or int() "
                "of each where a float holds a whole one"
                if isinstance(i, numbers.Real) or (isinstance(i, Tensor) and i.is_floating_point())
                else ": give the token ids themselves"
            )
            raise TypeError(
                f"pair {pair.index}: {field}[{k}] is {i!r}, a {type(i).__qualname__}; token ids "
                f"must be ints{fix}"
            ) from None
        if not -(2 ** (bits - 1)) <= value < 2 ** (bits - 1):
            raise ValueError(
                f"pair {pair.index}: {field}[{k}] holds token id {value}, outside int{bits}; "
                "token ids are indices into a vocabulary"
            )


def _token_stream(lists: list[list[int]], pairs: Sequence[TokenizedPair]) -> np.ndarray:
    """The ids of ``lists`` one after another, (N,) int64. A float among them (a hand-built
    pair's lists are taken as they are, unscanned) is named with its pair and field instead
    of being truncated to an int, as ``np.fromiter(..., dtype=np.int64)`` would silently.

    ``array.fromlist`` converts each list in C and refuses what is not an integer (it takes
    what has ``__index__``: ints, NumPy ints, and bools, which pass as 0 and 1 and are looked
    for among the ids of those values after it, as ``check_token_ids`` does before any work
    in ``fit`` and ``score_pairs``), and is no slower than that fromiter walk
    (benchmarks/RESULTS.md: 0.34 against 0.36 ms for 25,600 ids at best); scanning the lists
    for floats would cost a second walk."""
    ids = array.array("q")  # signed 64-bit, native order, as int64
    try:
        for part in lists:
            ids.fromlist(part)
    except (TypeError, OverflowError):
        check_token_ids(pairs)  # names the first bad id
        # no bad id: a field that is no list (set after the pair was built), walked by fromiter
        total = sum(len(part) for part in lists)
        return np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int64, count=total)
    stream = np.frombuffer(ids, dtype=np.int64)
    lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
    if first_bool(stream, np.cumsum(lengths) - lengths, lists) is not None:
        check_token_ids(pairs)  # names it by pair, field and position
    return stream


def pack_pairs(pairs: Sequence[TokenizedPair]) -> PackedBatch:
    """Pack ``pairs`` into one padding-free batch (tensors on CPU; use ``.to(device)``).

    Every pair needs a non-empty prompt (the first completion token is predicted from the last
    prompt token) and non-empty completions."""
    if len(pairs) == 0:
        raise ValueError("pack_pairs got no pairs; a batch needs at least one pair")
    seqs: list[list[int]] = []
    prompt_lens: list[int] = []
    for pair in pairs:
        _check_packable(pair)
        for completion in (pair.chosen_ids, pair.rejected_ids):
            seqs.append(pair.prompt_ids)
            seqs.append(completion)
            prompt_lens.append(len(pair.prompt_ids))
    # seqs alternates prompt, completion for each of the S sequences
    num_seqs = 2 * len(pairs)
    lens_np = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=2 * num_seqs)
    total = int(lens_np.sum())
    input_ids = _token_stream(seqs, pairs)  # (N,) flat prompt|completion|prompt|completion...
    prompt_len = np.asarray(prompt_lens, dtype=np.int64)  # (S,)
    seq_len = prompt_len + lens_np[1::2]  # (S,)

    cu_seqlens = np.zeros(num_seqs + 1, dtype=np.int64)
    np.cumsum(seq_len, out=cu_seqlens[1:])
    seq_ids = np.repeat(np.arange(num_seqs, dtype=np.int64), seq_len)  # (N,)
    position_ids = np.arange(total, dtype=np.int64) - np.repeat(cu_seqlens[:-1], seq_len)

    # position j of a sequence predicts token j+1; scored iff j+1 is a completion token,
    # i.e. prompt_len - 1 <= j <= seq_len - 2
    next_ids = np.empty_like(input_ids)
    next_ids[:-1] = input_ids[1:]
    next_ids[-1] = IGNORE_INDEX
    tok_prompt_len = prompt_len[seq_ids]
    tok_seq_len = seq_len[seq_ids]
    scored = (position_ids >= tok_prompt_len - 1) & (position_ids <= tok_seq_len - 2)
    labels = np.where(scored, next_ids, IGNORE_INDEX)

    return PackedBatch(
        input_ids=torch.from_numpy(input_ids),
        position_ids=torch.from_numpy(position_ids),
        labels=torch.from_numpy(labels),
        seq_ids=torch.from_numpy(seq_ids),
        cu_seqlens=torch.from_numpy(cu_seqlens.astype(np.int32)),
        max_seqlen=int(seq_len.max()),
        pair_indices=torch.tensor([p.index for p in pairs], dtype=torch.int64),
        completion_tokens=torch.from_numpy(lens_np[1::2].copy()),
    )


@dataclass(kw_only=True)
class SharedPromptBatch:
    """P pairs, each stored once as [prompt, chosen, rejected]; every tensor lives on one device.

    The decoder runs over ``input_ids`` with query sequences ``cu_seqlens`` (2P: [prompt,
    chosen] and [rejected] of each pair) and the key layout ``shared_prefix``. The head runs
    over the M = sum(C + R) rows ``head_index`` of its output, with ``labels`` and ``seq_ids``
    in the ordinary per-sequence order (sequence 2p = chosen, 2p+1 = rejected; no -100)."""

    input_ids: Tensor  # (N,) int64, N = sum(P + C + R)
    position_ids: Tensor  # (N,) int64: prompt 0..P-1, chosen P..P+C-1, rejected P..P+R-1
    cu_seqlens: Tensor  # (S+1,) int32: query sequences, lengths P+C and R per pair
    max_seqlen: int  # longest query sequence
    cu_seqlens_k: Tensor  # (S+1,) int32: key sequences, lengths P+C and P+R per pair
    max_seqlen_k: int  # longest key sequence
    kv_index: Tensor  # (K,) int64, K = sum(2P + C + R): stream row of each key
    head_index: Tensor  # (M,) int64: stream row that predicts each completion token
    labels: Tensor  # (M,) int64: the completion token each head row predicts
    seq_ids: Tensor  # (M,) int64 in [0, S)
    pair_indices: Tensor  # (P,) int64: TokenizedPair.index of each pair
    completion_tokens: Tensor  # (S,) int64: head rows (completion tokens) per sequence

    @property
    def num_pairs(self) -> int:
        return int(self.pair_indices.shape[0])

    @property
    def num_seqs(self) -> int:
        return int(self.cu_seqlens.shape[0]) - 1

    @property
    def num_tokens(self) -> int:
        """Tokens the decoder computes (each prompt once)."""
        return int(self.input_ids.shape[0])

    @property
    def unshared_tokens(self) -> int:
        """Tokens the same pairs occupy in an ordinary ``PackedBatch`` (each prompt twice):
        the count throughput is reported in, comparable with other trainers."""
        return int(self.kv_index.shape[0])

    @property
    def shared_prefix(self) -> SharedPrefix:
        """The key layout, as ``CausalLM.forward`` takes it."""
        return SharedPrefix(
            cu_seqlens_k=self.cu_seqlens_k, max_seqlen_k=self.max_seqlen_k, kv_index=self.kv_index
        )

    def pair_head_tokens(self) -> list[int]:
        """Head rows per pair (chosen + rejected completion tokens), read on the host: the
        ``pair_tokens`` of ``linear_pair_loss`` (call it on the CPU copy to avoid a sync)."""
        return (self.completion_tokens[0::2] + self.completion_tokens[1::2]).tolist()

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> SharedPromptBatch:
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        return dataclasses.replace(self, **moved)


def pack_pairs_shared(pairs: Sequence[TokenizedPair]) -> SharedPromptBatch:
    """Pack ``pairs`` with each prompt stored once (tensors on CPU; use ``to_device``).

    Same requirements as :func:`pack_pairs`; the per-sequence log-probs computed from the
    result equal those of :func:`pack_pairs` up to float rounding (see the module docstring)."""
    if len(pairs) == 0:
        raise ValueError("pack_pairs_shared got no pairs; a batch needs at least one pair")
    for pair in pairs:
        _check_packable(pair)
    num_pairs, num_seqs = len(pairs), 2 * len(pairs)
    prompt = np.fromiter((len(p.prompt_ids) for p in pairs), dtype=np.int64, count=num_pairs)
    chosen = np.fromiter((len(p.chosen_ids) for p in pairs), dtype=np.int64, count=num_pairs)
    rejected = np.fromiter((len(p.rejected_ids) for p in pairs), dtype=np.int64, count=num_pairs)
    total = int((prompt + chosen + rejected).sum())
    input_ids = _token_stream(
        [part for p in pairs for part in (p.prompt_ids, p.chosen_ids, p.rejected_ids)], pairs
    )  # (N,) prompt|chosen|rejected per pair

    def interleave(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # (P,), (P,) -> (S,)
        return np.stack([a, b], axis=1).reshape(-1)

    def starts(lengths: np.ndarray) -> np.ndarray:  # exclusive prefix sum
        out = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=out[1:])
        return out

    zeros = np.zeros(num_pairs, dtype=np.int64)
    pair_start = np.repeat(starts(prompt + chosen + rejected)[:-1], 2)  # (S,)
    # per sequence s: rows of its own (queries), how many prompt rows precede them as keys
    # (0 for chosen: its query rows include the prompt; P for rejected), and its completion
    q_len = interleave(prompt + chosen, rejected)  # (S,)
    prefix = interleave(zeros, prompt)  # (S,)
    completion = interleave(chosen, rejected)  # (S,)
    k_len = q_len + prefix  # (S,)
    cu_q, cu_k = starts(q_len), starts(k_len)

    # positions: the rejected completion continues from the prompt
    q_local = np.arange(total, dtype=np.int64) - np.repeat(cu_q[:-1], q_len)
    position_ids = q_local + np.repeat(prefix, q_len)

    # key t of sequence s: prompt row t of the pair when t < prefix, else its own query row
    k_local = np.arange(int(cu_k[-1]), dtype=np.int64) - np.repeat(cu_k[:-1], k_len)
    k_prefix = np.repeat(prefix, k_len)
    kv_index = np.where(
        k_local < k_prefix,
        np.repeat(pair_start, k_len) + k_local,
        np.repeat(cu_q[:-1], k_len) + k_local - k_prefix,
    )

    # completion token u of sequence s is predicted by the row before it: the last prompt row
    # for u = 0, else the sequence's own row of token u-1 (the chosen rows follow the prompt
    # rows, so for a chosen sequence both cases are last_prompt_row + u)
    u = np.arange(int(completion.sum()), dtype=np.int64) - np.repeat(
        starts(completion)[:-1], completion
    )
    last_prompt_row = np.repeat(pair_start + np.repeat(prompt, 2) - 1, completion)
    own_rows = np.repeat(cu_q[:-1] + interleave(prompt, zeros), completion) + u - 1
    head_index = np.where(u == 0, last_prompt_row, own_rows)
    labels = np.fromiter(  # the ids input_ids holds (checked there)
        itertools.chain.from_iterable(
            part for p in pairs for part in (p.chosen_ids, p.rejected_ids)
        ),
        dtype=np.int64,
        count=int(completion.sum()),
    )
    seq_ids = np.repeat(np.arange(num_seqs, dtype=np.int64), completion)

    return SharedPromptBatch(
        input_ids=torch.from_numpy(input_ids),
        position_ids=torch.from_numpy(position_ids),
        cu_seqlens=torch.from_numpy(cu_q.astype(np.int32)),
        max_seqlen=int(q_len.max()),
        cu_seqlens_k=torch.from_numpy(cu_k.astype(np.int32)),
        max_seqlen_k=int(k_len.max()),
        kv_index=torch.from_numpy(kv_index),
        head_index=torch.from_numpy(head_index),
        labels=torch.from_numpy(labels),
        seq_ids=torch.from_numpy(seq_ids),
        pair_indices=torch.tensor([p.index for p in pairs], dtype=torch.int64),
        completion_tokens=torch.from_numpy(completion),
    )


def batch_by_token_budget(
    pairs: Sequence[TokenizedPair], *, max_tokens: int, shuffle: bool = False, seed: int = 0
) -> list[list[int]]:
    """Group pairs into batches of at most ``max_tokens`` tokens; returns positions into ``pairs``.

    Greedy in order (next-fit): pairs are taken in the data order (or in one seeded permutation
    when ``shuffle``) and a new batch starts when the next pair would not fit. Every pair of batch
    b therefore comes before every pair of batch b+1, so the order is kept exactly, which keeps
    sDPO chunk order and resume-by-position simple; the cost is at most one pair's worth of unused
    budget per batch. A pair is never split: its chosen and rejected sequences share a batch.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    order = np.arange(len(pairs))
    if shuffle:
        order = np.random.default_rng(seed).permutation(len(pairs))
    batches: list[list[int]] = []
    current: list[int] = []
    used = 0
    for pos in order.tolist():
        need = pairs[pos].num_tokens
        if need > max_tokens:
            pair = pairs[pos]
            raise ValueError(
                f"pair at position {pos} (data index {pair.index}) needs {need} tokens "
                f"(prompt {len(pair.prompt_ids)} x2 + chosen {len(pair.chosen_ids)} + rejected "
                f"{len(pair.rejected_ids)}) but max_tokens is {max_tokens}: raise "
                f"max_tokens_per_batch to at least {need}, or lower max_length so pairs are "
                "truncated to fit"
            )
        if current and used + need > max_tokens:
            batches.append(current)
            current, used = [], 0
        current.append(pos)
        used += need
    if current:
        batches.append(current)
    return batches


@dataclass(kw_only=True)
class HeadRows:
    """The decoder-output rows the lm_head needs: those that predict a completion token.

    The log-prob head skips the prompt rows and each sequence's last row (their labels are
    -100), which saves their share of the 6·N·H·V head work."""

    index: Tensor  # (M,) int64: row of the decoder output
    labels: Tensor  # (M,) int64: the completion token that row predicts
    seq_ids: Tensor  # (M,) int64 in [0, S)
    pair_tokens: list[int]  # rows per pair (chosen + rejected completion tokens), on the host
    # (M,) float32 weight of each row's log-prob in its sequence's sum (LD-DPO); None: all 1
    token_weights: Tensor | None = None

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> HeadRows:
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return HeadRows(
            index=move(self.index),
            labels=move(self.labels),
            seq_ids=move(self.seq_ids),
            pair_tokens=self.pair_tokens,
            token_weights=move(self.token_weights),
        )


def check_ld_alpha(ld_alpha: float | None) -> None:
    """LD-DPO's ``ld_alpha`` is None (off) or a number in [0, 1]."""
    if ld_alpha is None:
        return
    if (
        not isinstance(ld_alpha, (int, float))
        or isinstance(ld_alpha, bool)
        or not 0.0 <= ld_alpha <= 1.0
    ):
        raise ValueError(
            f"ld_alpha must be None (off) or a number in [0, 1], got {ld_alpha!r}: it is the "
            "weight of the tokens past the shorter completion's length (LD-DPO; 1 is plain DPO)"
        )


def length_desensitized_weights(completion_tokens: Tensor, ld_alpha: float) -> Tensor:
    """LD-DPO's per-token weights over the head rows of a batch, (M,) float32.

    ``completion_tokens`` (S,): each sequence's completion length (chosen of pair p is
    sequence 2p, rejected 2p+1), whose head rows follow one another in completion order in
    both layouts. A pair's public length is min(chosen, rejected); the first ``public``
    tokens of each completion weigh 1, the rest ``ld_alpha``. So each completion's summed
    log-prob becomes (first ``public`` tokens) + ld_alpha * (the rest): the longer answer's
    excess length counts less, the shorter answer and equal-length pairs are unchanged."""
    check_ld_alpha(ld_alpha)
    counts = completion_tokens.to(torch.int64)  # (S,)
    public = torch.minimum(counts[0::2], counts[1::2]).repeat_interleave(2)  # (S,)
    starts = torch.cumsum(counts, 0) - counts  # (S,) first head row of each sequence
    rows = int(counts.sum())
    within = torch.arange(rows, dtype=torch.int64) - starts.repeat_interleave(counts)  # (M,)
    tail = within >= public.repeat_interleave(counts)
    return torch.where(tail, float(ld_alpha), 1.0).to(torch.float32)


def head_rows(batch: PackedBatch | SharedPromptBatch, *, ld_alpha: float | None = None) -> HeadRows:
    """The scored rows of ``batch``; call it on the host copy (it reads counts).

    ``ld_alpha`` (LD-DPO, ``loss.ld_alpha``): the rows get the weights of
    :func:`length_desensitized_weights`; None or 1: no weights (plain sums)."""
    weights = None
    if ld_alpha is not None and ld_alpha != 1:
        weights = length_desensitized_weights(batch.completion_tokens, ld_alpha)
    if isinstance(batch, SharedPromptBatch):
        return HeadRows(
            index=batch.head_index,
            labels=batch.labels,
            seq_ids=batch.seq_ids,
            pair_tokens=batch.pair_head_tokens(),
            token_weights=weights,
        )
    index = (batch.labels != IGNORE_INDEX).nonzero().squeeze(1)  # (M,)
    counts = batch.completion_tokens
    return HeadRows(
        index=index,
        labels=batch.labels[index],
        seq_ids=batch.seq_ids[index],
        pair_tokens=(counts[0::2] + counts[1::2]).tolist(),
        token_weights=weights,
    )


def to_device(
    x: Tensor | PackedBatch | SharedPromptBatch | HeadRows, device: torch.device
) -> Tensor | PackedBatch | SharedPromptBatch | HeadRows:
    """A CPU tensor (or a PackedBatch / SharedPromptBatch / HeadRows of them) on ``device``
    without stalling the host.

    On CUDA a plain ``.to(device)`` from pageable memory waits until the GPU has finished all
    queued work, once per tensor; staging through pinned memory with ``non_blocking=True`` lets
    the host pack the next micro-batch while the GPU still runs this one. The staging copy is
    this call's own, also for an input that is pinned already (``pin_memory()`` would hand that
    back as is), so the caller may change or free ``x`` as soon as this returns: the device
    reads the values ``x`` held at the call, however far behind the host it runs."""
    if device.type != "cuda":
        return x.to(device)
    if isinstance(x, Tensor):
        return _pinned_copy(x).to(device, non_blocking=True)
    pinned = {
        f.name: _pinned_copy(getattr(x, f.name))
        for f in dataclasses.fields(x)
        if isinstance(getattr(x, f.name), Tensor)
    }
    return dataclasses.replace(x, **pinned).to(device, non_blocking=True)


def _pinned_copy(t: Tensor) -> Tensor:
    """A copy of CPU tensor ``t`` in pinned memory that nothing else holds (the caching host
    allocator keeps its block from reuse until the copies queued from it have run)."""
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t)
