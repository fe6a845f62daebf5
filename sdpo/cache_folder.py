"""What a folder of sdpo caches holds, and removing what is no longer wanted from it.

A run's own cache folder (``OUTPUT_DIR/cache``) keeps one file per name, but a folder runs
share (``sdpo.cache_dir``) gains a file for every new key and never loses one. ``sdpo cache
list`` and ``sdpo cache prune`` (``sdpo.cli``) are built on this module.

:func:`scan_cache_folder` describes each entry of a folder from its name and its safetensors
header alone: the key in the metadata and the pair count from a tensor's shape. The tensors
are never read, and the header is read without setting the file's access time where the system
allows it (the owner's files on Linux), so that listing a folder counts as no use of its files.
:func:`select_for_pruning` picks the files a prune removes; :func:`remove_entry` removes one.

Only sdpo's cache files are ever removed: a file with a name a run writes (``initial``,
``eval-initial``, ``step-<t>``, ``reference``, ``tokens-train``, ``tokens-eval``, with or
without a key digest) whose header is sdpo's, of this release's format version or an earlier
one, or damaged; a later sdpo's files are left to it. The atomic writer's temporary files
(``.<file>.<random>.tmp``: a write in progress, or one a killed run left), files sdpo cannot
read, other files, links and folders are listed and left alone. Removing a file is safe while
runs use the folder: a run reads a cache file whole when it needs it (a file already opened
stays readable after its name is removed), and a run that finds it gone scores (or tokenizes)
those pairs again and writes the file anew.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdpo.engine.cache_format import (
    REF_CACHE_VERSION,
    REF_META_KEY_PREFIX,
    REF_META_VERSION,
    TOKEN_CACHE_VERSION,
    TOKEN_META_INFO,
    TOKEN_META_KEY,
    TOKEN_META_VERSION,
)
from sdpo.engine.files import KEY_DIGEST_CHARS, read_safetensors_header

__all__ = [
    "CacheEntry",
    "CacheFolderError",
    "find_cache_folder",
    "remove_entry",
    "scan_cache_folder",
    "select_for_pruning",
]

# the names a run gives its cache files (sdpo.runner: cached_reference, load_pairs), with the
# key's digest in a shared folder (sdpo.engine.files.keyed_path) or without it
_CACHE_NAME = re.compile(
    r"(?P<name>initial|eval-initial|reference|step-[1-9][0-9]*|tokens-(?:train|eval))"
    rf"(?:-(?P<digest>[0-9a-f]{{{KEY_DIGEST_CHARS}}}))?\.safetensors"
)
# the atomic writer's temporary file of one (sdpo.engine.files.atomic_open: mkstemp with the
# prefix ".<file>." and the suffix ".tmp")
_TEMP_NAME = re.compile(r"\.(?P<file>.+\.safetensors)\.[A-Za-z0-9_]+\.tmp")

# entry statuses; the first three are sdpo's cache files, which a prune may remove
OK = "ok"  # an sdpo cache file of this release's format (its checksum is checked when read)
OUTDATED = "outdated"  # of an earlier format version: runs of this release score it anew
DAMAGED = "damaged"  # its header cannot be an sdpo cache's: truncated, not safetensors, ...
LATER = "later"  # of a later format version: a later sdpo's runs (sharing the folder) read it
UNREADABLE = "unreadable"  # could not be opened (permissions): another user's runs may read it
WRITING = "writing"  # the atomic writer's temporary file
FOREIGN = "foreign"  # not an sdpo cache file: another name, a link, a folder, other metadata
REMOVABLE = (OK, OUTDATED, DAMAGED)


class CacheFolderError(ValueError):
    """A PATH given as a cache folder that is none; the message says what to pass instead."""


@dataclass(kw_only=True)
class CacheEntry:
    """One entry of a cache folder, as its name, ``lstat`` and safetensors header say."""

    path: Path
    status: str
    problem: str = ""  # why the status is not "ok", in words
    name: str | None = None  # "initial", "step-2", "tokens-train", ...: an sdpo cache's name
    digest: str | None = None  # the key digest in the file's name (a shared folder's files)
    size: int = 0  # bytes
    modified: float = 0.0  # seconds since the epoch
    accessed: float = 0.0  # as the file system records it (relatime: once a day at most)
    key: dict[str, Any] = field(default_factory=dict)  # the key the file was written under
    pairs: int | None = None
    # (device, inode, mtime ns, size): a file replaced after the scan is not removed unseen
    identity: tuple[int, int, int, int] = (0, 0, 0, 0)

    @property
    def last_used(self) -> float:
        """The later of the write and the last recorded read (runs read a file whole; where
        the file system records no reads, noatime, this is the time it was written)."""
        return max(self.modified, self.accessed)

    @property
    def removable(self) -> bool:
        return self.status in REMOVABLE

    @property
    def kind(self) -> str:
        """What the file holds, in the words the README uses."""
        if self.name is None:
            return "-"
        if self.name.startswith("tokens-"):
            return "tokens " + self.name.removeprefix("tokens-")  # tokens train / tokens eval
        if self.name.startswith("step-"):
            return "step " + self.name.removeprefix("step-")  # M_{t-1}'s values of chunk t
        return {"reference": "sdpo.reference"}.get(self.name, self.name)

    def summary(self) -> tuple[str, str, str]:
        """(model, data, settings): the key's main fields, short, for one line of a table. A
        token cache's model is the tokenizer's fingerprint, its data the sources' names."""
        key = self.key
        if not key:
            return "-", "-", ""
        lengths = f"len {key.get('max_length')}/{key.get('max_prompt_length')}"
        if self.name is not None and self.name.startswith("tokens-"):
            sources = key.get("sources")
            names = [str(s[0]) for s in sources if isinstance(s, list) and s] if sources else []
            tokenizer = key.get("tokenizer_fingerprint")
            settings = [lengths, str(key.get("truncation")), f"vocab {key.get('vocab_size')}"]
            return _short(tokenizer), "+".join(names) or "-", " ".join(settings)
        settings = [
            str(key.get("dtype_policy")),
            str(key.get("kernels_impl")),
            lengths,
            str(key.get("truncation")),
        ]
        if key.get("share_prompt"):
            settings.append("share_prompt")
        if key.get("ld_alpha") not in (None, 1):
            settings.append(f"ld_alpha {key['ld_alpha']}")
        if key.get("sharded_bf16_params"):
            settings.append("fsdp bf16 params")
        return (
            _short(key.get("model_fingerprint")),
            _short(key.get("data_fingerprint")),
            " ".join(settings),
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "file": self.path.name,
            "path": str(self.path),
            "status": self.status,
            "problem": self.problem or None,
            "name": self.name,
            "kind": self.kind if self.name is not None else None,
            "digest": self.digest,
            "size": self.size,
            "modified": self.modified,
            "last_used": self.last_used,
            "pairs": self.pairs,
            "key": dict(sorted(self.key.items())) or None,
        }


def _short(value: object) -> str:
    """A fingerprint's first 12 hex digits (as the runner's messages name them)."""
    return str(value)[:12] if value else "-"


# ---------------------------------------------------------------------------------------------
# reading a folder


def scan_cache_folder(folder: str | os.PathLike) -> list[CacheEntry]:
    """Every entry of ``folder``, by name; an entry removed during the scan is left out. Raises
    ``OSError`` only when the folder itself cannot be read."""
    entries = []
    with os.scandir(folder) as items:
        for item in items:
            entry = _describe_entry(Path(item.path))
            if entry is not None:
                entries.append(entry)
    return sorted(entries, key=lambda e: e.path.name)


def _describe_entry(path: Path) -> CacheEntry | None:
    """``path`` as a cache folder's entry; None when it is gone. Never raises on its content."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    entry = CacheEntry(
        path=path,
        status=FOREIGN,
        size=st.st_size,
        modified=st.st_mtime,
        accessed=st.st_atime,
        identity=(st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size),
    )
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
        entry.size = 0 if stat.S_ISDIR(st.st_mode) else entry.size
        entry.problem = (
            "a symbolic link"
            if stat.S_ISLNK(st.st_mode)
            else "a folder"
            if stat.S_ISDIR(st.st_mode)
            else "not a regular file"
        )
        return entry
    temp = _TEMP_NAME.fullmatch(path.name)
    if temp is not None and _CACHE_NAME.fullmatch(temp["file"]):
        entry.status = WRITING
        entry.problem = (
            f"a write of {temp['file']} in progress, or one a killed run left: never pruned "
            "(remove it by hand when no run uses the folder)"
        )
        return entry
    match = _CACHE_NAME.fullmatch(path.name)
    if match is None:
        entry.problem = "not an sdpo cache file's name"
        return entry
    entry.name, entry.digest = match["name"], match["digest"]
    try:
        header = _read_header(path)
    except OSError as e:
        entry.status, entry.problem = UNREADABLE, f"cannot be read: {e.strerror or e}"
        return entry
    except ValueError as e:
        entry.status, entry.problem = DAMAGED, str(e)
        return entry
    _read_key(entry, header)
    return entry


def _read_key(entry: CacheEntry, header: dict[str, Any]) -> None:
    """Status, key and pair count of an sdpo-named file from its parsed header."""
    meta = header.get("__metadata__")
    meta = meta if isinstance(meta, dict) else {}
    tokens_name = entry.name is not None and entry.name.startswith("tokens-")
    if REF_META_VERSION not in meta and TOKEN_META_VERSION not in meta:
        entry.status = FOREIGN
        entry.problem = "a safetensors file without sdpo's cache metadata"
        return
    if (TOKEN_META_VERSION in meta) != tokens_name:
        held, named = ("a reference", "a token") if tokens_name else ("a token", "a reference")
        entry.status = DAMAGED
        entry.problem = f"holds {held} cache under {named} cache's name: no run reads it"
        return
    version = meta.get(TOKEN_META_VERSION if tokens_name else REF_META_VERSION)
    current = TOKEN_CACHE_VERSION if tokens_name else REF_CACHE_VERSION
    try:
        if tokens_name:
            key = json.loads(meta.get(TOKEN_META_KEY, ""))
            json.loads(meta.get(TOKEN_META_INFO, "{}"))
        else:
            key = {
                name.removeprefix(REF_META_KEY_PREFIX): json.loads(value)
                for name, value in meta.items()
                if name.startswith(REF_META_KEY_PREFIX)
            }
    except (TypeError, ValueError):
        entry.status, entry.problem = DAMAGED, "its key in the metadata is not valid JSON"
        return
    if not isinstance(key, dict):
        entry.status, entry.problem = DAMAGED, "its key in the metadata is not a JSON object"
        return
    entry.key = key
    counted = header.get("index" if tokens_name else "pair_indices")
    shape = counted.get("shape") if isinstance(counted, dict) else None
    if isinstance(shape, list) and len(shape) == 1 and isinstance(shape[0], int):
        entry.pairs = shape[0]
    if _is_later(version, current):
        entry.status = LATER
        entry.problem = (
            f"format version {version!r}, written by a later sdpo (this one writes {current!r}), "
            "whose runs read it: never pruned here (prune it with that sdpo)"
        )
    elif version != current:
        entry.status = OUTDATED
        entry.problem = (
            f"format version {version!r}; this sdpo writes {current!r} and scores such files anew"
        )
    elif entry.pairs is None:
        entry.status, entry.problem = DAMAGED, "no per-pair tensor in the header"
    else:
        entry.status = OK


def _is_later(version: object, current: str) -> bool:
    """Whether ``version`` is a format version that a later sdpo writes (the versions are whole
    numbers, counted up when a format changes)."""
    later = isinstance(version, str) and version.isascii() and version.isdigit()
    return later and int(version) > int(current)


def _read_header(path: Path) -> dict[str, Any]:
    """The parsed header of the safetensors file at ``path`` (``read_safetensors_header``),
    checked against the file's size; the tensors are not read. ``ValueError`` says what is
    wrong with the file."""
    fd = _open_without_access_time(path)
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        header, n = read_safetensors_header(f, size=size)
    end = 0
    for name, tensor in header.items():
        if name == "__metadata__":
            continue
        offsets = tensor.get("data_offsets") if isinstance(tensor, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2) or not all(
            type(o) is int for o in offsets
        ):
            raise ValueError(f"tensor {name!r} has no data offsets in the header (damaged)")
        end = max(end, *offsets)
    if 8 + n + end != size:
        raise ValueError(
            f"file is {size} bytes, its header describes {8 + n + end} (truncated or damaged)"
        )
    return header


def _open_without_access_time(path: Path) -> int:
    """A read-only descriptor of ``path`` whose reads leave its access time as it was, where the
    system allows it (Linux's O_NOATIME: the file's owner); otherwise a plain one."""
    noatime = getattr(os, "O_NOATIME", 0)
    if noatime:
        try:
            return os.open(path, os.O_RDONLY | noatime)
        except PermissionError:  # not the owner (EPERM), or not readable (EACCES, again below)
            pass
    return os.open(path, os.O_RDONLY)


# ---------------------------------------------------------------------------------------------
# which folder a PATH means


def find_cache_folder(path: str | os.PathLike) -> tuple[Path, str]:
    """The cache folder ``path`` stands for, and how it was found (for the first line of
    the output): a cache folder itself; a run's output folder (its ``config.toml`` names
    ``sdpo.cache_dir``, else ``OUTPUT_DIR/cache``); or a run's TOML config (its
    ``sdpo.cache_dir``, else its ``output_dir``/cache). The folder a config names may not
    exist yet. Raises ``CacheFolderError`` for anything else, and for a config that does not
    load."""
    path = Path(path)
    if not path.exists():
        raise CacheFolderError(
            f"{path} does not exist; pass a cache folder (OUTPUT_DIR/cache, or the folder "
            "sdpo.cache_dir names), a run's output folder or its TOML config"
        )
    if path.is_file():
        if path.suffix == ".toml":
            return _folder_of_config(path, output_dir=None)
        if _CACHE_NAME.fullmatch(path.name):
            raise CacheFolderError(
                f"{path} is a cache file; pass the folder that holds it: {path.parent}"
            )
        raise CacheFolderError(
            f"{path} is a file, not a cache folder; pass a cache folder (OUTPUT_DIR/cache, or "
            "the folder sdpo.cache_dir names), a run's output folder or its TOML config"
        )
    if (path / "config.toml").is_file():  # a run's output folder, config.toml as it resolved
        return _folder_of_config(path / "config.toml", output_dir=path)
    try:
        names = sorted(p.name for p in path.iterdir())
    except OSError as e:
        raise CacheFolderError(f"{path} cannot be read: {e.strerror or e}") from None
    if not names or any(
        _CACHE_NAME.fullmatch(n) or (m := _TEMP_NAME.fullmatch(n)) and _CACHE_NAME.fullmatch(m[1])
        for n in names
    ):
        return path, "a cache folder"
    if (path / "cache").is_dir():  # an output folder whose config.toml is not written (yet)
        return path / "cache", f"the cache folder of the output folder {path}"
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    runs = [n for n in names if (path / n / "config.toml").is_file()]
    hint = f" ({', '.join(runs[:3])}: a run's output folder)" if runs else ""
    raise CacheFolderError(
        f"{path} is not an sdpo cache folder: none of its {len(names)} entries ({shown}) is an "
        "sdpo cache file (initial.safetensors, tokens-train-<digest>.safetensors, ...). Pass a "
        "cache folder (OUTPUT_DIR/cache, or the folder sdpo.cache_dir names), a run's output "
        f"folder{hint} or its TOML config"
    )


def _folder_of_config(config: Path, *, output_dir: Path | None) -> tuple[Path, str]:
    """The cache folder of a run's config: its ``sdpo.cache_dir``, else ``cache`` in its
    output folder: ``output_dir``, the folder that holds the config, where it has a ``cache``
    folder (an output folder moved since its run), else the config's ``output_dir``."""
    from sdpo.config import ConfigError, load_config

    try:
        cfg = load_config(config)
    except ConfigError as e:
        own = "OUTPUT_DIR/cache" if output_dir is None else str(output_dir / "cache")
        raise CacheFolderError(
            f"config error: {e}; to list or prune the run's cache, pass its cache folder itself "
            f"(the folder sdpo.cache_dir names, else {own})"
        ) from None
    if cfg.sdpo.cache_dir:
        return Path(cfg.sdpo.cache_dir), f"sdpo.cache_dir of {config}"
    moved = output_dir is not None and (output_dir / "cache").is_dir()
    out = output_dir if moved else Path(cfg.output_dir)
    return out / "cache", f"the run's own cache folder: {config} sets no sdpo.cache_dir"


# ---------------------------------------------------------------------------------------------
# pruning


def select_for_pruning(
    entries: Sequence[CacheEntry],
    *,
    now: float,
    older_than: float | None = None,
    keep_last: int | None = None,
    unusable: bool = False,
) -> list[CacheEntry]:
    """The sdpo cache files among ``entries`` that every given selector picks: last used more
    than ``older_than`` seconds before ``now``; not among the ``keep_last`` most recently used
    readable (status "ok") files of their name (``initial``, ``step-2``, ``tokens-train``,
    ...); ``unusable``: damaged or of another format version, which no run of this release
    reads. With no selector given, none is picked."""
    if older_than is None and keep_last is None and not unusable:
        return []
    kept: set[Path] = set()
    if keep_last is not None:
        by_name: dict[str, list[CacheEntry]] = {}
        for e in entries:
            if e.status == OK and e.name is not None:
                by_name.setdefault(e.name, []).append(e)
        for group in by_name.values():
            group.sort(key=lambda e: (e.last_used, e.path.name), reverse=True)
            kept.update(e.path for e in group[:keep_last])
    return [
        e
        for e in entries
        if e.removable
        and (older_than is None or now - e.last_used > older_than)
        and e.path not in kept
        and (not unusable or e.status != OK)
    ]


def remove_entry(entry: CacheEntry) -> str | None:
    """Remove ``entry``'s file; None when removed, else why it was not: gone already, or
    written again since it was scanned (a run that replaced it uses it). ``OSError`` when the
    removal fails."""
    try:
        st = entry.path.lstat()
    except FileNotFoundError:
        return "gone already"
    if (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size) != entry.identity:
        return "written again since it was read"
    entry.path.unlink()
    return None
