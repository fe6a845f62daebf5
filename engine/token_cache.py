"""The tokenized-data cache: a rerun or a resume skips reading, validating and tokenizing.

Reading and validating every row and tokenizing it (chat templates included) is deterministic,
so its result is written once next to the run (``tokens-<name>.safetensors`` in the run's cache
folder; ``tokens-<name>-<digest>.safetensors``, named by its key's digest, in a folder runs
share: :func:`keyed_token_cache_path`) and reused while nothing that changes it has changed. The key (:func:`token_cache_key`)
holds everything that does: the sha256 of each data file's bytes with its path, source name and
split and subset, in order; the tokenizer files (chat template files and an older folder's
``added_tokens.json`` included); the length and truncation settings; the identical-pairs
policy; the model's vocabulary size and context length (checked at load time, so a cached
pair is known to pass them); and the source of the reading and tokenizing code itself, so an
edit to either reads the data again. A hub data set has no file to hash: no key, no cache.

The file is one safetensors file: the token ids of all pairs as flat int32 arrays with int64
offsets, each pair's index, source id and truncated flag, the UTF-8 JSON of each pair's place
("file line N", for error messages) and, in the metadata, the key, the source names, the
:class:`TokenizeStats` numbers and a sha256 checksum of all of it. :func:`load_tokenized`
returns the pairs only when the format, key and checksum all match, and otherwise says why in
plain words; it never raises. Files are written atomically (``sdpo.engine.files``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import safetensors.numpy

from . import data as _data_module
from . import tokenize as _tokenize_module
from . import tokenizer_classes as _tokenizer_classes_module
from .cache_format import TOKEN_CACHE_VERSION
from .cache_format import TOKEN_META_CHECKSUM as _META_CHECKSUM
from .cache_format import TOKEN_META_INFO as _META_INFO
from .cache_format import TOKEN_META_KEY as _META_KEY
from .cache_format import TOKEN_META_VERSION as _META_VERSION
from .data import cyclic_gc_paused
from .files import atomic_write_bytes, keyed_path, safetensors_metadata
from .packing import TokenizedPair, id_array
from .resume import file_sha256
from .tokenize import (
    ADDED_TOKENS_FILE,
    CHAT_TEMPLATE_DIR,
    CHAT_TEMPLATE_FILE,
    PROCESSOR_CHAT_TEMPLATE_FILE,
    SPECIAL_TOKENS_MAP_FILE,
    TokenizeStats,
)

__all__ = [
    "TOKEN_CACHE_VERSION",
    "load_tokenized",
    "token_cache_changes",
    "token_cache_digest",
    "keyed_token_cache_path",
    "pack_pairs",
    "save_packed",
    "save_tokenized",
    "token_cache_key",
    "token_cache_path",
    "unpack_pairs",
]

# what PairTokenizer.from_dir reads: the tokenizer, its config, an older folder's added tokens
# and the chat template files
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    SPECIAL_TOKENS_MAP_FILE,
    ADDED_TOKENS_FILE,
    CHAT_TEMPLATE_FILE,
    PROCESSOR_CHAT_TEMPLATE_FILE,
)

_SEQUENCES = ("prompt", "chosen", "rejected")
# Tensor names and dtypes, in the order the checksum hashes them.
_TENSOR_DTYPES: dict[str, np.dtype] = {
    **{f"{s}_ids": np.dtype(np.int32) for s in _SEQUENCES},
    **{f"{s}_offsets": np.dtype(np.int64) for s in _SEQUENCES},
    "index": np.dtype(np.int64),
    "source_id": np.dtype(np.int32),
    "truncated": np.dtype(np.uint8),
    "places_json": np.dtype(np.uint8),
}

Tokenized = tuple[list[TokenizedPair], dict[int, str], TokenizeStats]


class SourceLike(Protocol):
    """A data source as configured (``sdpo.config.DataSource`` fits); an optional ``columns``
    (a mapping, or an object with ``as_dict()``) renames fields and is part of the key."""

    name: str
    path: str
    split: str


def token_cache_path(cache_dir: str | os.PathLike, name: str) -> Path:
    """``<cache_dir>/tokens-<name>.safetensors`` (name: "train", "eval")."""
    return Path(cache_dir) / f"tokens-{name}.safetensors"


def token_cache_digest(key: Mapping[str, Any]) -> str:
    """sha256 hex of ``key`` as the file stores it (JSON, keys sorted): equal keys, one digest."""
    text = json.dumps(json.loads(json.dumps(dict(key))), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def keyed_token_cache_path(plain: str | os.PathLike, key: Mapping[str, Any]) -> Path:
    """The token cache of ``key`` in a folder shared by runs: ``plain``
    (``token_cache_path``) with the key's digest in its name, ``tokens-train-<digest>``."""
    return keyed_path(plain, token_cache_digest(key))


def _folder_sha256(folder: Path) -> str:
    """sha256 over every file below ``folder`` (relative path and content), in path order."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(path.relative_to(folder).as_posix().encode() + b"\0")
        h.update(file_sha256(path).encode())
    return h.hexdigest()


def token_cache_key(
    sources: Sequence[SourceLike],
    *,
    tokenizer_dir: str | os.PathLike,
    max_length: int,
    max_prompt_length: int | None,
    truncation: str,
    identical_pairs: str,
    vocab_size: int,
    context_length: int | None,
    tokenizer_fingerprint: str | None = None,
) -> dict[str, Any] | None:
    """The key of the tokenized ``sources``: a JSON-able dict, or None when a source is not
    local (a hub name, or a missing path that reading will report) and so cannot be
    fingerprinted. Data files (every file of a data set folder) and tokenizer files are hashed
    in full (streamed). ``tokenizer_fingerprint`` (``PairTokenizer.fingerprint``) covers what
    the tokenizer takes from elsewhere: EOS/BOS from ``config.json`` when
    tokenizer_config.json names none, and the pipeline of the tokenizer class its model type
    picks."""
    files = []
    for source in sources:
        path = Path(os.fspath(source.path)).expanduser()
        if path.is_file():
            digest = file_sha256(path)
        elif path.is_dir():
            digest = _folder_sha256(path)
        else:
            return None
        columns = getattr(source, "columns", None)
        columns = columns.as_dict() if hasattr(columns, "as_dict") else dict(columns or {})
        subset = getattr(source, "subset", None)
        files.append([source.name, os.fspath(source.path), source.split, subset, digest, columns])
    folder = Path(tokenizer_dir)
    tokenizer = {
        name: file_sha256(folder / name) if (folder / name).is_file() else None
        for name in TOKENIZER_FILES
    }
    templates = folder / CHAT_TEMPLATE_DIR
    tokenizer[CHAT_TEMPLATE_DIR] = _folder_sha256(templates) if templates.is_dir() else None
    code = hashlib.sha256()
    for module in (_data_module, _tokenize_module, _tokenizer_classes_module):
        code.update(Path(module.__file__).read_bytes())
    return {
        "sources": files,
        "tokenizer": tokenizer,
        "max_length": max_length,
        "max_prompt_length": max_prompt_length,
        "truncation": truncation,
        "identical_pairs": identical_pairs,
        "vocab_size": vocab_size,
        "context_length": context_length,
        "tokenizer_fingerprint": tokenizer_fingerprint,
        "code": code.hexdigest(),
    }


def pack_pairs(
    pairs: Sequence[TokenizedPair], places: Mapping[int, str]
) -> tuple[dict[str, np.ndarray], list[str]]:
    """``pairs`` and their places (keyed by ``pair.index``; "" where missing) as flat arrays:
    the token ids of each sequence kind as one int32 array with int64 offsets, each pair's
    index, source id and truncated flag, and the UTF-8 JSON of the places in pair order; with
    the source names the ids refer to. :func:`unpack_pairs` inverts it exactly. The token cache
    stores these arrays; data parallel runs send them from rank 0 to the other ranks."""
    names = list(dict.fromkeys(p.source for p in pairs))
    source_ids = {name: i for i, name in enumerate(names)}
    tensors: dict[str, np.ndarray] = {}
    for seq in _SEQUENCES:
        # one C walk per list; a float, a bool or an id outside int32 is named, not stored
        ids, offsets = id_array(pairs, fields=(f"{seq}_ids",), typecode="i")
        tensors[f"{seq}_offsets"] = offsets
        tensors[f"{seq}_ids"] = ids.astype(np.int32, copy=False)
    tensors["index"] = np.asarray([p.index for p in pairs], dtype=np.int64)
    tensors["source_id"] = np.asarray([source_ids[p.source] for p in pairs], dtype=np.int32)
    tensors["truncated"] = np.asarray([p.truncated for p in pairs], dtype=np.uint8)
    place_list = [places.get(p.index, "") for p in pairs]
    tensors["places_json"] = np.frombuffer(json.dumps(place_list).encode("utf-8"), np.uint8)
    return tensors, names


@cyclic_gc_paused()
def unpack_pairs(
    tensors: Mapping[str, np.ndarray], names: Sequence[str]
) -> tuple[list[TokenizedPair], dict[int, str]]:
    """The pairs and places :func:`pack_pairs` made ``tensors`` and ``names`` of. Token ids
    from a vocabulary share one int object per id value (``_int_table``). Raises
    ``ValueError`` when the arrays do not fit together."""
    index = tensors["index"].tolist()
    n = len(index)
    ids: dict[str, list[list[int]]] = {}
    table = _int_table([tensors[f"{seq}_ids"] for seq in _SEQUENCES])
    for seq in _SEQUENCES:
        flat = tensors[f"{seq}_ids"]
        offsets = tensors[f"{seq}_offsets"].tolist()
        if len(offsets) != n + 1 or offsets[-1] != len(flat):
            raise ValueError(f"{seq} offsets do not match the ids")
        # (N,) object: references into the table, no new ints
        shared = flat if table is None else table[flat]
        ids[seq] = [shared[offsets[i] : offsets[i + 1]].tolist() for i in range(n)]
    sources = [names[i] for i in tensors["source_id"].tolist()]
    truncated = tensors["truncated"].tolist()
    place_list = json.loads(tensors["places_json"].tobytes().decode("utf-8"))
    if not len(sources) == len(truncated) == len(place_list) == n:
        raise ValueError("per-pair arrays differ in length")
    pairs = [
        TokenizedPair(
            index=index[i],
            prompt_ids=ids["prompt"][i],
            chosen_ids=ids["chosen"][i],
            rejected_ids=ids["rejected"][i],
            source=sources[i],
            truncated=bool(truncated[i]),
        )
        for i in range(n)
    ]
    return pairs, {index[i]: place_list[i] for i in range(n)}


def save_tokenized(
    path: str | os.PathLike,
    pairs: Sequence[TokenizedPair],
    places: Mapping[int, str],
    stats: TokenizeStats,
    key: Mapping[str, Any],
) -> None:
    """Write ``pairs`` (with each pair's place, keyed by ``pair.index``) and ``stats`` under
    ``key``; an older file stays intact until the new one is complete."""
    save_packed(path, *pack_pairs(pairs, places), stats, key)


def save_packed(
    path: str | os.PathLike,
    tensors: Mapping[str, np.ndarray],
    names: Sequence[str],
    stats: TokenizeStats,
    key: Mapping[str, Any],
) -> None:
    """:func:`save_tokenized` of pairs already packed (``pack_pairs(pairs, places)``): the same
    file, without packing them again."""
    tensors = dict(tensors)
    names = list(names)
    info = json.dumps({"sources": names, "stats": stats.as_dict()}, sort_keys=True)
    metadata = {
        _META_VERSION: TOKEN_CACHE_VERSION,
        _META_KEY: json.dumps(dict(key), sort_keys=True),
        _META_INFO: info,
        _META_CHECKSUM: _checksum(tensors, info),
    }
    atomic_write_bytes(path, safetensors.numpy.save(tensors, metadata=metadata))


def load_tokenized(path: str | os.PathLike, key: Mapping[str, Any]) -> tuple[Tokenized | None, str]:
    """``((pairs, places, stats), "ok")`` when the file at ``path`` holds data tokenized under
    ``key`` intact, else ``(None, reason)``: "missing", "format version …", "key mismatch: …",
    "checksum mismatch (file damaged)" or "unreadable: …". Never raises on a bad file."""
    try:
        blob = Path(path).read_bytes()
    except FileNotFoundError:
        return None, "missing"
    except OSError as e:
        return None, f"unreadable: {e.strerror or e}"
    try:
        metadata = safetensors_metadata(blob, holds="an sdpo token cache")
    except ValueError as e:
        return None, f"unreadable: {e}"
    version = metadata.get(_META_VERSION)
    if version != TOKEN_CACHE_VERSION:
        return None, f"format version {version!r} is not the current {TOKEN_CACHE_VERSION!r}"
    try:
        cached_key = json.loads(metadata.get(_META_KEY, ""))
    except ValueError:
        return None, "unreadable: the key is not valid JSON"
    now = json.loads(json.dumps(dict(key)))  # the JSON round trip turns tuples into lists
    if not isinstance(cached_key, dict):
        return None, "unreadable: the key is not a JSON object"
    for name in sorted(set(now) | set(cached_key)):
        if cached_key.get(name) != now.get(name):
            return (
                None,
                f"key mismatch: {_describe_change(name, cached_key.get(name), now.get(name))}",
            )
    try:
        tensors = safetensors.numpy.load(blob)
        wrong = [
            n for n, dt in _TENSOR_DTYPES.items() if n not in tensors or tensors[n].dtype != dt
        ]
        if wrong:
            return None, f"unreadable: tensors {wrong} are missing or of another dtype"
        info_text = metadata.get(_META_INFO, "")
        if _checksum(tensors, info_text) != metadata.get(_META_CHECKSUM):
            return None, "checksum mismatch (file damaged)"
        return _decode(tensors, json.loads(info_text)), "ok"
    except Exception as e:  # the safetensors parser raises its own error type
        return None, f"unreadable: {e}"


def token_cache_changes(path: str | os.PathLike, key: Mapping[str, Any]) -> list[str]:
    """What differs in ``key`` from the key the token cache at ``path`` was written under, one
    phrase per part ("data source near (near.jsonl) changed", "the tokenizing code changed",
    ...), where ``load_tokenized`` names the first alone; [] for a missing or unreadable file
    or the same key. Never raises."""
    try:
        metadata = safetensors_metadata(Path(path).read_bytes(), holds="an sdpo token cache")
        cached = json.loads(metadata.get(_META_KEY, ""))
    except (OSError, ValueError):
        return []
    if not isinstance(cached, dict) or metadata.get(_META_VERSION) != TOKEN_CACHE_VERSION:
        return []
    now = json.loads(json.dumps(dict(key)))
    changes = []
    # a part, or a tokenizer file, that one of the two keys' releases did not record is not
    # known to have changed (later releases added tokenizer_fingerprint, and hash more files)
    for name in sorted(set(now) & set(cached)):
        old, new = cached[name], now[name]
        if name == "tokenizer" and isinstance(old, dict) and isinstance(new, dict):
            new = {k: v for k, v in new.items() if k in old}
        old, new = _comparable(name, old), _comparable(name, new)
        if old != new:
            changes.append(_describe_change(name, old, new))
    return changes


_DIGEST = re.compile(r"[0-9a-f]{64}")


def _comparable(name: str, value: Any) -> Any:
    """A key part as files written by every release compare: a source by its name, path, split,
    subset, data digest and set columns wherever its entry holds them (later releases added
    the subset), the tokenizer files without those absent from the folder."""
    if name == "sources" and isinstance(value, list):
        sources = []
        for entry in value:
            if not isinstance(entry, list) or len(entry) < 4:
                return value
            digest = next((x for x in entry if isinstance(x, str) and _DIGEST.fullmatch(x)), None)
            subset = entry[3] if len(entry) >= 6 else None
            columns = next((x for x in entry if isinstance(x, dict)), {})
            sources.append([*entry[:3], subset, digest, columns])
        return sources
    if name == "tokenizer" and isinstance(value, dict):
        return {k: v for k, v in value.items() if v is not None}
    return value


def _decode(tensors: Mapping[str, np.ndarray], info: dict[str, Any]) -> Tokenized:
    pairs, places = unpack_pairs(tensors, info["sources"])
    return pairs, places, TokenizeStats(**info["stats"])


def _int_table(flats: Sequence[np.ndarray]) -> np.ndarray | None:
    """(V,) object array: the int object of each token id 0..V-1, or None (ids are then
    made one per token).

    A list holding one int object per token costs 36 bytes a token (a 28-byte int and an
    8-byte slot). Token ids come from a vocabulary far smaller than the data, so each id
    value is made once and the pairs' lists share those objects: 8 bytes a token. Ids outside
    [0, number of tokens) (not from a vocabulary) take the plain path."""
    total = sum(f.size for f in flats)
    present = [f for f in flats if f.size]
    if not present or min(int(f.min()) for f in present) < 0:
        return None
    size = max(int(f.max()) for f in present) + 1
    if size > total:
        return None
    table = np.empty(size, dtype=object)
    table[:] = range(size)
    return table


def _describe_change(name: str, cached: Any, now: Any) -> str:
    if name == "sources" and isinstance(cached, list) and isinstance(now, list):
        if len(cached) == len(now):
            for old, new in zip(cached, now):
                if old != new:
                    return f"data source {new[0]} ({new[1]}) changed"
        return "the list of data sources changed"
    if name in ("tokenizer", "code"):
        return {"tokenizer": "the tokenizer files changed", "code": "the tokenizing code changed"}[
            name
        ]
    if name == "tokenizer_fingerprint":
        return "the tokenizer as sdpo reads it changed"
    return f"{name} differs (cached {cached!r}, now {now!r})"


def _checksum(tensors: Mapping[str, np.ndarray], info: str) -> str:
    h = hashlib.sha256(info.encode("utf-8"))
    for name in _TENSOR_DTYPES:
        array = np.ascontiguousarray(tensors[name])
        h.update(name.encode("utf-8"))
        h.update(struct.pack("<Q", array.size))
        h.update(array.tobytes())
    return h.hexdigest()
