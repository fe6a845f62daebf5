"""Padding-free packing of preference pairs and token-budget batching.

A batch of P pairs becomes ONE flat token stream of S = 2P sequences (chosen of pair p is
sequence 2p, rejected is 2p+1), delimited by ``cu_seqlens``. No pad token is ever computed on,
so the cost of a batch is its real token count; ``batch_by_token_budget`` groups pairs so that
each batch holds at most ``max_tokens`` tokens.

Labels are already shifted: ``labels[i]`` is the token that position i must predict when that
token is a completion token of the same sequence, else -100. Summing log p(labels[i] | prefix)
over ``labels != -100`` gives log pi(completion | prompt) of each sequence, so the loss code never
needs to know where prompts end.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

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

    @property
    def num_tokens(self) -> int:
        """Tokens this pair occupies in a packed batch (the prompt is stored twice)."""
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


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


def pack_pairs(pairs: Sequence[TokenizedPair]) -> PackedBatch:
    """Pack ``pairs`` into one padding-free batch (tensors on CPU; use ``.to(device)``).

    Every pair needs a non-empty prompt (the first completion token is predicted from the last
    prompt token) and non-empty completions."""
    if len(pairs) == 0:
        raise ValueError("pack_pairs got no pairs; a batch needs at least one pair")
    seqs: list[list[int]] = []
    prompt_lens: list[int] = []
    for pair in pairs:
        if not pair.prompt_ids:
            raise ValueError(
                f"pair {pair.index} has an empty prompt; every sequence needs at least one prompt "
                "token (tokenize with a BOS token or give the row a prompt)"
            )
        for name, completion in (("chosen", pair.chosen_ids), ("rejected", pair.rejected_ids)):
            if not completion:
                raise ValueError(
                    f"pair {pair.index} has an empty {name} completion; nothing would be scored "
                    "(re-tokenize with a larger max_length)"
                )
            seqs.append(pair.prompt_ids)
            seqs.append(completion)
            prompt_lens.append(len(pair.prompt_ids))
    # seqs alternates prompt, completion for each of the S sequences
    num_seqs = 2 * len(pairs)
    lens_np = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=2 * num_seqs)
    total = int(lens_np.sum())
    input_ids = np.fromiter(
        (t for s in seqs for t in s), dtype=np.int64, count=total
    )  # (N,) flat prompt|completion|prompt|completion...
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


def to_device(x: Tensor | PackedBatch, device: torch.device) -> Tensor | PackedBatch:
    """A CPU tensor (or a PackedBatch of them) on ``device`` without stalling the host.

    On CUDA a plain ``.to(device)`` from pageable memory waits until the GPU has finished all
    queued work, once per tensor; staging through pinned memory with ``non_blocking=True`` lets
    the host pack the next micro-batch while the GPU still runs this one."""
    if device.type != "cuda":
        return x.to(device)
    if isinstance(x, Tensor):
        return x.pin_memory().to(device, non_blocking=True)
    pinned = {
        f.name: getattr(x, f.name).pin_memory()
        for f in dataclasses.fields(x)
        if isinstance(getattr(x, f.name), Tensor)
    }
    return dataclasses.replace(x, **pinned).to(device, non_blocking=True)
