"""Crash-safe file writes: every file the engine writes goes through here; and the header of
a safetensors file, read without its tensors (the caches' metadata: their keys and versions).

A file is written under a temporary name in the same folder, flushed and fsync'ed, then renamed
over the real name, so a crash leaves either the old file or the new one, never half of one.

Permissions are those a plain ``open`` / ``mkdir`` would give (0666 / 0777 less the process's
umask), or the replaced file's own: the private mode of ``tempfile``'s names does not survive
the rename, so teammates and serving users can read a run's outputs as with any other file.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import stat
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, BinaryIO


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's umask, read without changing it (``os.umask`` sets it, for every thread,
    while it reads it): from ``/proc`` on Linux, otherwise the value at import."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return _UMASK_AT_IMPORT


_UMASK_AT_IMPORT = os.umask(0o022)
os.umask(_UMASK_AT_IMPORT)


def _mode_for(path: Path, *, directory: bool) -> int:
    """The mode a new ``path`` gets: the one it has if it exists, else the umask's default."""
    with contextlib.suppress(OSError):
        return stat.S_IMODE(path.stat().st_mode)
    return (0o777 if directory else 0o666) & ~_umask()


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open ``path`` for writing through a temporary file that is renamed into place on success.

    On any exception the temporary file is removed and ``path`` is left untouched."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open supports modes 'w' and 'wb', not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _mode_for(path, directory=False))
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory under a temporary sibling name and rename it to ``path`` on success.

    An existing ``path`` is replaced only after the new one is complete (it is moved aside,
    the new one renamed in, then the old one deleted)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, _mode_for(path, directory=True))
        yield tmp
        # what was written inside is new: the umask's modes (safetensors writes owner-only)
        umask = _umask()
        for root, dirs, files in os.walk(tmp):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o777 & ~umask)
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~umask)
        _fsync_dir(tmp)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def append_jsonl(path: str | os.PathLike, obj: Any) -> None:
    """Append one JSON object as a line, flushed. (Appends are line-atomic for readers that
    skip a torn last line; metrics readers in sdpo do.)"""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(obj, sort_keys=True) + "\n")
        f.flush()


# hex digits of a key's digest in a shared cache's file names: files of different keys
# coexist, and a file is still checked against its whole key when read
KEY_DIGEST_CHARS = 16


def keyed_path(plain: str | os.PathLike, digest: str) -> Path:
    """``plain`` (``DIR/NAME.safetensors``) with the first ``KEY_DIGEST_CHARS`` hex digits of
    its key's digest before the suffix: ``DIR/NAME-<digest>.safetensors``, the file of that
    key in a cache folder shared by runs."""
    plain = Path(plain)
    return plain.with_name(f"{plain.stem}-{digest[:KEY_DIGEST_CHARS]}{plain.suffix}")


# safetensors refuses larger headers: a length past it is damage, not a header to read
SAFETENSORS_MAX_HEADER_BYTES = 100_000_000


def read_safetensors_header(f: BinaryIO, *, size: int) -> tuple[dict[str, Any], int]:
    """The parsed header of the safetensors file ``f``, read from its start, ``size`` bytes in
    all (a u64 little-endian length, then that many bytes of JSON), and that length; the
    tensors are not read. ``ValueError`` says what is wrong with the file."""
    head = f.read(8)
    if len(head) < 8:
        raise ValueError(f"file is {size} bytes, too short for a safetensors header")
    (n,) = struct.unpack("<Q", head)
    if n > size - 8:
        raise ValueError("header length runs past the end of the file (file truncated)")
    if n > SAFETENSORS_MAX_HEADER_BYTES:
        raise ValueError(f"header length {n} is more than safetensors reads (file damaged)")
    try:
        header = json.loads(f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ValueError("header is not valid JSON (not safetensors, or damaged)") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object (not safetensors, or damaged)")
    return header, n


def safetensors_metadata(data: bytes, *, holds: str) -> dict[str, str]:
    """The ``__metadata__`` of the safetensors file whose bytes are ``data``; ``holds`` names
    what such a file holds, for the ``ValueError`` of a file without it."""
    header, _ = read_safetensors_header(io.BytesIO(data), size=len(data))
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict):
        raise ValueError(f"no metadata in the header (not {holds})")
    return metadata
