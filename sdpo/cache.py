"""The on-disk reference log-prob cache: what lets sDPO drop the frozen reference model.

Each sDPO step needs, for every pair of its chunk, the reference model's summed log-probs of the
chosen and rejected completions. They are computed once with no gradients, written here, and
training reads only this file, so the reference model never sits beside the policy in memory.

A cache file is one safetensors file holding five (P,) tensors and string metadata:
the :class:`CacheKey` fields (everything that changes the numbers), a sha256 checksum of the
tensor bytes and a format version. :meth:`RefLogprobCache.load` accepts a file only when the
key and the checksum match, and otherwise says why in plain words (so the caller can recompute
and tell the user); it never raises on a damaged file. Files are written atomically. In a folder
runs share, a file is named by its key's digest (:func:`keyed_cache_path`), so the files of
other keys stay beside it.

Fingerprints (:func:`data_fingerprint`, :func:`file_fingerprint`; the model's is
``sdpo.engine.checkpoint.model_fingerprint``) are sha256 hex digests used to build keys.
"""

from __future__ import annotations

import array
import dataclasses
import hashlib
import itertools
import json
import numbers
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import safetensors.torch
import torch

from sdpo.engine.cache_format import REF_CACHE_VERSION as CACHE_FORMAT_VERSION
from sdpo.engine.cache_format import REF_META_CHECKSUM as _META_CHECKSUM
from sdpo.engine.cache_format import REF_META_KEY_PREFIX as _META_KEY_PREFIX
from sdpo.engine.cache_format import REF_META_VERSION as _META_VERSION
from sdpo.engine.files import atomic_open, keyed_path, safetensors_metadata
from sdpo.engine.packing import (
    ID_FIELDS,
    TokenizedPair,
    append_ids,
    bool_id_error,
    first_bool,
)
from sdpo.engine.resume import file_sha256

if TYPE_CHECKING:
    from sdpo.engine.scoring import PairLogps

__all__ = [
    "CACHE_FORMAT_VERSION",
    "CacheKey",
    "RefLogprobCache",
    "RefValues",
    "data_fingerprint",
    "file_fingerprint",
    "keyed_cache_path",
]

# Tensor names in the file and their storage dtypes, in the order the checksum hashes them.
_TENSOR_DTYPES: dict[str, torch.dtype] = {
    "pair_indices": torch.int64,
    "chosen_logps": torch.float32,
    "rejected_logps": torch.float32,
    "chosen_tokens": torch.int64,
    "rejected_tokens": torch.int64,
}


@dataclass(kw_only=True)
class RefValues:
    """Reference values of P pairs, aligned by position: entry i belongs to pair
    ``pair_indices[i]`` (the ``TokenizedPair.index``). Tensors are stored on CPU in the dtypes
    below; inputs of other dtypes/devices are converted."""

    pair_indices: torch.Tensor  # (P,) int64, unique
    chosen_logps: torch.Tensor  # (P,) float32: log pi_ref(chosen | prompt), summed over tokens
    rejected_logps: torch.Tensor  # (P,) float32
    chosen_tokens: torch.Tensor  # (P,) int64: scored completion tokens of the chosen sequence
    rejected_tokens: torch.Tensor  # (P,) int64

    def __post_init__(self) -> None:
        sizes = {}
        for name, dtype in _TENSOR_DTYPES.items():
            value = torch.as_tensor(getattr(self, name)).detach()
            if dtype == torch.int64:
                _check_whole_numbers(name, value)
            value = value.to(device="cpu", dtype=dtype)
            if value.dim() != 1:
                raise ValueError(
                    f"RefValues.{name} must be 1-D (one value per pair), got shape "
                    f"{tuple(value.shape)}"
                )
            setattr(self, name, value.contiguous())
            sizes[name] = value.numel()
        if len(set(sizes.values())) != 1:
            raise ValueError(
                f"RefValues tensors must have one length (one entry per pair), got {sizes}"
            )
        if self.pair_indices.numel() != torch.unique(self.pair_indices).numel():
            uniq, counts = torch.unique(self.pair_indices, return_counts=True)
            dup = uniq[counts > 1][:5].tolist()
            raise ValueError(
                f"RefValues.pair_indices must be unique; repeated pair indices: {dup}. "
                "Each pair must be scored once."
            )

    @classmethod
    def from_scores(cls, scores: object) -> RefValues:
        """Copy the five fields from a scoring result, e.g. ``sdpo.engine.scoring.PairLogps``."""
        return cls(**{name: getattr(scores, name) for name in _TENSOR_DTYPES})

    def to_pair_logps(self) -> PairLogps:
        """The same values as the engine's scoring result type (what the trainer consumes)."""
        from sdpo.engine.scoring import PairLogps  # imported here: it pulls in the kernels

        return PairLogps(**self.tensors())

    @property
    def num_pairs(self) -> int:
        return self.pair_indices.numel()

    def __len__(self) -> int:
        return self.num_pairs

    @property
    def gamma(self) -> torch.Tensor:
        """(P,) float32 reference log-ratio gamma = log pi(chosen|x) - log pi(rejected|x)."""
        return self.chosen_logps - self.rejected_logps

    def reward_accuracy(self) -> float:
        """Share of pairs the model already prefers (gamma > 0); NaN for no pairs."""
        if self.num_pairs == 0:
            return float("nan")
        return (self.gamma > 0).double().mean().item()

    def mean_gamma(self) -> float:
        """Mean gamma in float64; NaN for no pairs."""
        if self.num_pairs == 0:
            return float("nan")
        return self.gamma.double().mean().item()

    def subset(self, pair_indices: Sequence[int] | torch.Tensor) -> RefValues:
        """The values of the given pairs, in the given order. Raises KeyError naming pair
        indices that are not in this set, and ValueError for a pair index given twice (the
        result holds each pair once, as every RefValues does) or a boolean mask."""
        query = torch.as_tensor(pair_indices)
        if query.dtype == torch.bool:
            raise ValueError(
                "RefValues.subset takes pair indices (TokenizedPair.index), not a boolean mask; "
                "for a mask over these values pass values.pair_indices[mask]"
            )
        if query.is_floating_point() and not bool((query == query.round()).all()):
            raise ValueError(
                f"RefValues.subset takes integer pair indices, got {query.reshape(-1)[:5].tolist()}"
            )
        query = query.to(torch.int64).reshape(-1)
        _check_no_repeats(query)
        order = torch.argsort(self.pair_indices)
        have = self.pair_indices[order]  # (P,) sorted
        pos = torch.searchsorted(have, query).clamp_(max=max(have.numel() - 1, 0))
        found = (have[pos] == query) if have.numel() else torch.zeros_like(query, dtype=torch.bool)
        if not bool(found.all()):
            missing = query[~found]
            raise KeyError(
                f"{missing.numel()} pair(s) have no reference values, e.g. pair indices "
                f"{missing[:5].tolist()}: the cache was built for other pairs; recompute it."
            )
        take = order[pos]
        return RefValues(**{name: getattr(self, name)[take] for name in _TENSOR_DTYPES})

    @classmethod
    def concat(cls, parts: Iterable[RefValues]) -> RefValues:
        """Join values of disjoint pair sets (order kept: parts one after another)."""
        parts = list(parts)
        if not parts:
            return cls(**{name: torch.empty(0, dtype=dt) for name, dt in _TENSOR_DTYPES.items()})
        _check_disjoint(parts)
        return cls(
            **{name: torch.cat([getattr(p, name) for p in parts]) for name in _TENSOR_DTYPES}
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in _TENSOR_DTYPES}


def _check_whole_numbers(name: str, value: torch.Tensor) -> None:
    """An int64 field of RefValues given as floats holds whole numbers (the conversion would
    truncate 2.5 to 2, giving a pair another pair's values), and is no boolean mask: refused
    as ``RefValues.subset`` refuses such indices."""
    what = "pair indices (TokenizedPair.index)" if name == "pair_indices" else "token counts"
    if value.dtype == torch.bool:
        hint = ": for a mask over the pairs, index them: pair_indices[mask]"
        raise ValueError(
            f"RefValues.{name} takes {what}, not a boolean mask"
            + (hint if name == "pair_indices" else "")
        )
    if value.is_complex():
        raise ValueError(f"RefValues.{name} takes {what}, got a tensor of {value.dtype}")
    if not value.is_floating_point():
        return
    flat = value.reshape(-1)
    bad = flat[~torch.isfinite(flat) | (flat != flat.round())]
    if bad.numel():
        raise ValueError(
            f"RefValues.{name} takes whole-number {what}, got {bad[:5].tolist()} among its "
            f"{value.dtype} values; pass integers (a fraction is refused, not truncated)"
        )


def _check_disjoint(parts: list[RefValues]) -> None:
    """RefValues.concat's parts hold disjoint pairs: a pair in two of them is named with both
    (the joined table's own check would blame "pair_indices" as if one part were damaged)."""
    where = torch.cat([torch.full((p.num_pairs,), k) for k, p in enumerate(parts)])
    indices = torch.cat([p.pair_indices for p in parts])
    _, inverse, counts = torch.unique(indices, return_inverse=True, return_counts=True)
    repeated = counts[inverse] > 1
    if bool(repeated.any()):
        value = int(indices[repeated.nonzero()[0, 0]])
        holders = sorted(set(where[indices == value].tolist()))
        raise ValueError(
            f"RefValues.concat: pair index {value} is in parts {holders}; the parts must hold "
            "disjoint pairs (take one part's values with RefValues.subset first)"
        )


def _check_no_repeats(query: torch.Tensor) -> None:
    """RefValues.subset's pair indices are each given once: the first repeated one is named,
    with the positions where it stands."""
    _, inverse, counts = torch.unique(query, return_inverse=True, return_counts=True)
    repeated = counts[inverse] > 1
    if not bool(repeated.any()):
        return
    value = int(query[repeated.nonzero()[0, 0]])
    where = (query == value).nonzero()[:, 0].tolist()
    raise ValueError(
        f"RefValues.subset: pair index {value} is given {len(where)} times, at positions "
        f"{where[:5]}{' ...' if len(where) > 5 else ''} of the {query.numel()} indices; a "
        "RefValues holds each pair once, so ask for each pair once (torch.unique) and repeat "
        "rows of the result's tensors where a pair is needed twice"
    )


@dataclass(kw_only=True, frozen=True)
class CacheKey:
    """Everything that changes the cached numbers. Two runs with equal keys compute the same
    reference values, so a cache is reused only when the whole key matches."""

    model_fingerprint: str  # the reference model's weights (and config)
    data_fingerprint: str  # the token ids of the chunk's pairs (see data_fingerprint)
    tokenizer_fingerprint: str  # tokenizer.json (the token ids themselves: data_fingerprint)
    max_length: int
    max_prompt_length: int | None
    truncation: str
    dtype_policy: str  # e.g. "bf16" / "fp32": the dtype the reference forward ran in
    kernels_impl: str  # the resolved log-prob implementation ("triton" | "torch")
    # scored with each prompt computed once (train.share_prompt): equal values up to rounding,
    # but not to the bit in bf16, so it is part of the key
    share_prompt: bool = False
    # LD-DPO's loss.ld_alpha: the reference values are length-desensitized sums like the
    # policy's. None for plain sums: 1 gives the same numbers bit for bit, so a key built with
    # 1 is stored as None (equal keys, equal digests, the same file accepted)
    ld_alpha: float | None = None
    # bf16-mixed sharded over several ranks (train.fsdp): FSDP gathers bf16 copies of the
    # parameters for the forward where one process autocasts over the fp32 ones, which rounds
    # otherwise (norm weights and the residual stream in bf16), far more than share_prompt;
    # fp32 and bf16 compute alike sharded or whole and leave it False (one cache for both)
    sharded_bf16_params: bool = False

    def __post_init__(self) -> None:
        # the fields are written as JSON and compared with what a file holds, so each is
        # checked here: a torch.dtype or bytes would fail in json at save, a "1024" would
        # never equal 1024
        for name in _KEY_STRS:
            value = getattr(self, name)
            if not isinstance(value, str):
                hint = " (name it, e.g. 'bf16')" if name == "dtype_policy" else ""
                raise TypeError(
                    f"CacheKey.{name} must be a str, got {type(value).__qualname__} {value!r}{hint}"
                )
        for name in ("max_length", "max_prompt_length"):
            value = getattr(self, name)
            if value is None and name == "max_prompt_length":
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(
                    f"CacheKey.{name} must be an int, got {type(value).__qualname__} {value!r}"
                )
            object.__setattr__(self, name, int(value))  # a NumPy int as the same key
        for name in ("share_prompt", "sharded_bf16_params"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"CacheKey.{name} must be a bool, got {getattr(self, name)!r}")
        object.__setattr__(self, "ld_alpha", _key_ld_alpha(self.ld_alpha))

    def fields(self) -> dict[str, str | int | float | None]:
        fields = dataclasses.asdict(self)
        # absent means the default: keys (and digests) written before an option existed
        # stay valid
        for name in ("share_prompt", "sharded_bf16_params"):
            if not fields[name]:
                del fields[name]
        if self.ld_alpha is None:
            del fields["ld_alpha"]
        return fields

    def digest(self) -> str:
        """sha256 hex of the key (stable across runs; usable in a file name)."""
        text = json.dumps(self.fields(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


def keyed_cache_path(plain: str | os.PathLike, key: CacheKey) -> Path:
    """The file of ``key`` in a cache folder shared by runs: ``plain``
    (``DIR/initial.safetensors``) with the key's digest in its name,
    ``DIR/initial-<digest>.safetensors``; files of other keys beside it stay."""
    _check_key(key)
    return keyed_path(plain, key.digest())


_KEY_STRS = (
    "model_fingerprint",
    "data_fingerprint",
    "tokenizer_fingerprint",
    "truncation",
    "dtype_policy",
    "kernels_impl",
)


def _key_ld_alpha(value: object) -> float | None:
    """A key's ``ld_alpha``: None for plain sums (unset or 1), else the number as a float, so
    that 0.5 and a NumPy 0.5 (or 0 and 0.0) give one key and one digest."""
    from sdpo.engine.packing import check_ld_alpha  # imported here: it pulls in the kernels

    if value is None:
        return None
    check_ld_alpha(value)
    value = float(value)
    return None if value == 1.0 else value


def _means_plain_sums(raw: str) -> bool:
    """Whether a stored ``key.ld_alpha`` is 1 (or 1.0): the same numbers as no ld_alpha."""
    try:
        value = json.loads(raw)
    except ValueError:
        return False
    return type(value) in (int, float) and value == 1


def _short(value: object) -> str:
    text = str(value)
    return text if len(text) <= 12 else text[:12] + "…"


def _tensors_checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in _TENSOR_DTYPES:
        t = tensors[name]
        h.update(name.encode("utf-8"))
        h.update(struct.pack("<Q", t.numel()))
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class RefLogprobCache:
    """One cache file at ``path`` (a ``.safetensors`` file).

    >>> cache = RefLogprobCache(run_dir / "step-1" / "ref_logps.safetensors")
    >>> values, why = cache.load(key)
    >>> if values is None:
    ...     print(f"reference cache not used ({why}); computing it")
    ...     values = score(...); cache.save(values, key)
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RefLogprobCache({str(self.path)!r})"

    def exists(self) -> bool:
        return self.path.is_file()

    def save(self, values: RefValues, key: CacheKey) -> None:
        """Write ``values`` under ``key``; the old file (if any) stays intact until the new one
        is complete."""
        _check_key(key)
        if not isinstance(values, RefValues):
            raise TypeError(
                f"values must be a sdpo.cache.RefValues, got {type(values).__qualname__}: "
                "RefValues.from_scores(result) converts a scoring result (score_pairs' PairLogps)"
            )
        tensors = values.tensors()
        metadata = {_META_VERSION: CACHE_FORMAT_VERSION, _META_CHECKSUM: _tensors_checksum(tensors)}
        for name, value in key.fields().items():
            metadata[_META_KEY_PREFIX + name] = json.dumps(value)
        with atomic_open(self.path, "wb") as f:
            f.write(safetensors.torch.save(tensors, metadata=metadata))

    def load(self, key: CacheKey) -> tuple[RefValues | None, str]:
        """``(values, "ok")`` when the file exists and its key and checksum match, else
        ``(None, reason)`` with reason one of "missing", "format version …", "key mismatch: …",
        "checksum mismatch (file damaged)", "unreadable: …". Never raises on a bad file."""
        _check_key(key)
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None, "missing"
        except OSError as e:
            return None, f"unreadable: {e.strerror or e}"
        try:
            metadata = safetensors_metadata(data, holds="an sdpo reference cache")
        except ValueError as e:
            return None, f"unreadable: {e}"

        version = metadata.get(_META_VERSION)
        if version != CACHE_FORMAT_VERSION:
            return None, f"format version {version!r} is not the current {CACHE_FORMAT_VERSION!r}"

        now_fields = key.fields()
        for meta_name in sorted(metadata):
            name = meta_name.removeprefix(_META_KEY_PREFIX)
            if name != meta_name and name not in now_fields:  # e.g. share_prompt = true
                if name == "ld_alpha" and _means_plain_sums(metadata[meta_name]):
                    continue  # written by a key that kept ld_alpha = 1: the plain sums
                cached = _short(metadata[meta_name])
                return None, f"key mismatch: {name} differs (cached {cached}, now unset)"
        for name, now in now_fields.items():
            raw = metadata.get(_META_KEY_PREFIX + name)
            try:
                cached = json.loads(raw) if raw is not None else None
            except ValueError:
                return None, f"unreadable: key field {name} is not valid JSON"
            if raw is None or cached != now:
                return None, (
                    f"key mismatch: {name} differs (cached {_short(cached)}, now {_short(now)})"
                )

        try:
            tensors = safetensors.torch.load(data)
        except Exception as e:  # the safetensors parser raises its own error type
            return None, f"unreadable: {e}"
        missing = [n for n in _TENSOR_DTYPES if n not in tensors]
        if missing:
            return None, f"unreadable: tensors {missing} are missing"
        wrong = [n for n, dt in _TENSOR_DTYPES.items() if tensors[n].dtype != dt]
        if wrong:
            return None, f"unreadable: tensors {wrong} have unexpected dtypes"
        if _tensors_checksum(tensors) != metadata.get(_META_CHECKSUM):
            return None, "checksum mismatch (file damaged)"
        try:
            values = RefValues(**{n: tensors[n] for n in _TENSOR_DTYPES})
        except ValueError as e:
            return None, f"unreadable: {e}"
        return values, "ok"


def _check_key(key: object) -> None:
    """RefLogprobCache's key, named when it is something else (the arguments of ``save``
    swapped, a dict of fields) instead of an AttributeError from inside."""
    if not isinstance(key, CacheKey):
        raise TypeError(f"key must be a sdpo.cache.CacheKey, got {type(key).__qualname__}")


# ---------------------------------------------------------------------------------------------
# Fingerprints


def data_fingerprint(pairs: Iterable[TokenizedPair]) -> str:
    """sha256 hex of the pairs' indices and token ids, in order.

    Each pair contributes ``[index, len(prompt), len(chosen), len(rejected)]`` followed by the
    three id lists, as little-endian int32; lengths are included so moving a token from prompt
    to completion changes the fingerprint. The ids of a few hundred pairs at a time are
    gathered into one int32 buffer, a list per C walk that refuses a float (once truncated:
    8.5 hashed as 8) or an id outside int32, naming its pair, field and position; a bool,
    which the walk takes as 0 or 1, is refused after it (``first_bool``). A pair index
    outside int32 (a caller's own 64-bit ids; ``TokenizedPair.index`` is any int64) enters
    that stream as its low 32 bits, and the digest is then taken once more over the stream's
    digest and every such pair's position and full index, under a prefix of its own: indices
    within int32 keep the fingerprint they always had, and no two different pair lists share
    one."""
    h = hashlib.sha256(b"sdpo.pairs.v1")
    count = 0
    wide: list[tuple[int, int]] = []  # (position, index) of each index outside int32

    def word(position: int, index: int) -> int:
        if -(2**31) <= index < 2**31:
            return index
        wide.append((position, index))
        return (index + 2**31) % 2**32 - 2**31

    remaining = iter(pairs)
    while group := list(itertools.islice(remaining, 512)):
        try:
            lists = [ids for p in group for ids in (p.prompt_ids, p.chosen_ids, p.rejected_ids)]
            indices = [word(count + j, p.index) for j, p in enumerate(group)]
        except AttributeError:
            _name_non_pair(group, first=count)
            raise
        try:
            stream = _int32_stream(indices, lists)
        except (TypeError, OverflowError):  # a bad id (named here), or a field that is no list
            lists = [append_ids(array.array("i"), p, field) for p in group for field in ID_FIELDS]
            stream = _int32_stream(indices, lists)
        lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
        # list i begins after the lists before it and the 4-word heads of its pair and those before
        starts = np.cumsum(lengths) - lengths + 4 * (np.arange(len(lists)) // 3 + 1)
        if found := first_bool(stream, starts, lists):
            span, k = found
            raise bool_id_error(group[span // 3], ID_FIELDS[span % 3], k, lists[span][k])
        h.update(stream.astype("<i4", copy=False).tobytes())
        count += len(group)
    h.update(struct.pack("<Q", count))
    if not wide:
        return h.hexdigest()
    outer = hashlib.sha256(b"sdpo.pairs.v1.wide")
    outer.update(h.digest())
    for position, index in wide:
        outer.update(struct.pack("<Qq", position, index))
    return outer.hexdigest()


def _int32_stream(indices: list[int], lists: list[list]) -> np.ndarray:
    """data_fingerprint's words of a group of pairs: per pair its index and three lengths, then
    its three id lists (``lists``, three a pair), each walked once in C; a float, None or an id
    outside int32 raises there (a bool passes as 0 or 1)."""
    buffer = array.array("i")  # C int: int32 on every platform torch supports
    add = buffer.fromlist
    parts = iter(lists)
    for index, prompt, chosen, rejected in zip(indices, parts, parts, parts):
        add([index, len(prompt), len(chosen), len(rejected)])
        add(prompt)
        add(chosen)
        add(rejected)
    return np.frombuffer(buffer, dtype=np.int32)


def _name_non_pair(group: list[object], *, first: int) -> None:
    """data_fingerprint's error for an item that is not a pair (a data set's row, a dict of
    ``*_input_ids``): named by its position, with what to pass instead. Looked for only after
    the hashing failed, so the pairs cost no check each."""
    fields = ("index", "prompt_ids", "chosen_ids", "rejected_ids")
    for j, p in enumerate(group):
        if not all(hasattr(p, field) for field in fields):
            row = " (a data set's row?)" if isinstance(p, Mapping) else ""
            raise TypeError(
                f"data_fingerprint: pairs[{first + j}] is a {type(p).__qualname__}{row}, not a "
                "TokenizedPair: the fingerprint hashes token ids, so pass the tokenized pairs "
                "(sdpo.engine.tokenize.tokenize_pairs, or TokenizedPair(index=..., "
                "prompt_ids=..., chosen_ids=..., rejected_ids=...))"
            ) from None


def file_fingerprint(path: str | os.PathLike) -> str:
    """sha256 hex of a file's bytes (e.g. tokenizer.json), streamed."""
    return file_sha256(path)
