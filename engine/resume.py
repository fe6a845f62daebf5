"""Training checkpoints that make a killed run resumable to the same bits, and the fault hook
that tests it.

A training checkpoint is a folder ``<root>/ckpt-<run_step>/`` (``run_step``: optimizer steps
done by the whole run, zero-padded so names sort) built under a temporary name by
``atomic_directory`` and renamed into place only when complete. Its last file is
``MANIFEST.json``: the sha256 and size of every file in the folder, plus of "external" files the
checkpoint relies on but does not copy (a finished sDPO step's ``step-<t>/`` weights). A
checkpoint is *complete* when its manifest is present and every listed file matches it; resume
takes the newest complete one and reports every other (a temporary folder of an interrupted
write, a folder whose files no longer match). What goes inside (weights, optimizer and RNG
states, data position) is the caller's; this module owns the folder protocol.

``fault_point`` is a test hook: with ``SDPO_FAULT_AT="<point>:<count>[:<SIGNAL>]"`` in the
environment the process sends itself SIGKILL (or the named signal, ``TERM`` or ``SIGTERM``) the
``count``-th time it reaches ``fault_point("<point>")``; ``OOM`` in place of the signal raises
``torch.OutOfMemoryError`` there instead, as a GPU out of memory would. The fault-injection
tests use it to kill the real CLI at exact places; without the variable it costs one dictionary
lookup. Several rules are separated by commas (``"ckpt_write:2:HOLD,train_step:3"``). The
action ``HOLD`` is for a point reached by a background checkpoint write (``train.async_save``,
``sdpo.engine.async_save``): the writer thread stops there until the training thread waits for
that write, so a test can act (kill, change the weights) while a write is surely in flight.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sdpo.engine.files import atomic_directory, atomic_write_json

MANIFEST_NAME = "MANIFEST.json"
MANIFEST_FORMAT = 1
FAULT_ENV = "SDPO_FAULT_AT"
_NAME = re.compile(r"^ckpt-(\d+)$")
_fault_counts: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Kill (or signal, or hold) this process here when ``SDPO_FAULT_AT`` names this point (test
    hook, module docstring)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    rules = [rule.split(":") for rule in spec.split(",")]
    mine = [rule for rule in rules if rule[0] == name]
    if not mine:
        return
    count = _fault_counts[name] = _fault_counts.get(name, 0) + 1
    for rule in mine:
        if count != int(rule[1] if len(rule) > 1 and rule[1] else 1):
            continue
        action = rule[2] if len(rule) > 2 else ""
        if action == "HOLD":
            _hold(name)
            continue
        if action == "OOM":
            import torch

            raise torch.OutOfMemoryError(f"out of memory ({FAULT_ENV} test hook at {name!r})")
        sig = _fault_signal(action)
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), sig)


def _fault_signal(action: str) -> signal.Signals:
    """The signal a fault rule's action names (``TERM`` or ``SIGTERM``; empty: SIGKILL); an
    action that is none is named, not an AttributeError from the ``signal`` module."""
    if not action:
        return signal.SIGKILL
    name = action.upper()
    sig = getattr(signal, name if name.startswith("SIG") else f"SIG{name}", None)
    if not isinstance(sig, signal.Signals):
        raise ValueError(
            f"{FAULT_ENV}: unknown action {action!r}; use a signal name (TERM or SIGTERM, INT, "
            "KILL, ...), OOM or HOLD"
        )
    return sig


_hold_release = threading.local()


@contextlib.contextmanager
def holds_released_by(event: threading.Event) -> Iterator[None]:
    """A ``HOLD`` fault point reached by this thread inside the block waits for ``event``."""
    _hold_release.event = event
    try:
        yield
    finally:
        _hold_release.event = None


def _hold(name: str) -> None:
    event = getattr(_hold_release, "event", None)
    if event is None:
        raise RuntimeError(
            f"{FAULT_ENV}: HOLD at {name!r} is for points a background checkpoint write reaches "
            "(train.async_save = true); here it would wait forever"
        )
    event.wait()


def checkpoint_name(run_step: int) -> str:
    return f"ckpt-{run_step:08d}"


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def file_digests(paths: Sequence[Path]) -> list[str]:
    """The sha256 of each file, several files at once: hashlib releases the GIL while it hashes,
    so the weight shards of a large checkpoint are read and hashed in parallel (one core each
    hashes about 1-2 GB/s)."""
    if len(paths) <= 1:
        return [file_sha256(p) for p in paths]
    workers = min(len(paths), 8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(file_sha256, paths))


def file_entries(paths: Iterable[Path], *, base: Path) -> dict[str, dict[str, object]]:
    """{path relative to ``base``: {"sha256", "bytes"}} for manifests."""
    paths = sorted(paths)
    return {
        p.relative_to(base).as_posix(): {"sha256": digest, "bytes": p.stat().st_size}
        for p, digest in zip(paths, file_digests(paths))
    }


def write_checkpoint(
    path: Path,
    *,
    write_contents: Callable[[Path], None],
    external: dict[str, dict[str, object]] | None = None,
) -> None:
    """Build the checkpoint folder ``path`` atomically: ``write_contents(tmp)`` fills a
    temporary folder, then the manifest is written last and the folder renamed into place.

    ``external``: manifest entries (see ``file_entries``) of files outside the folder, with
    paths relative to the folder's parent's parent (the run's output folder). A failing write
    (disk full) removes the temporary folder and leaves every older checkpoint as it was."""
    with atomic_directory(path) as tmp:
        write_contents(tmp)
        fault_point("ckpt_write")
        files = [p for p in tmp.rglob("*") if p.is_file()]
        manifest = {
            "format": MANIFEST_FORMAT,
            "files": file_entries(files, base=tmp),
            "external": external or {},
        }
        atomic_write_json(tmp / MANIFEST_NAME, manifest)


def verify_checkpoint(path: Path) -> str | None:
    """None when the checkpoint at ``path`` is complete, else the reason it is not."""
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file():
        return f"no {MANIFEST_NAME} (the write did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        groups = [(path, manifest["files"]), (path.parent.parent, manifest["external"])]
    except (ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST_NAME} is unreadable ({e})"
    if manifest.get("format") != MANIFEST_FORMAT:
        return f"{MANIFEST_NAME} has format {manifest.get('format')!r}, not {MANIFEST_FORMAT}"
    listed = [
        (base / rel, rel, entry) for base, entries in groups for rel, entry in entries.items()
    ]
    for file, rel, entry in listed:
        if not file.is_file():
            return f"{rel} is missing"
        if file.stat().st_size != entry["bytes"]:
            return f"{rel} does not match its checksum"
    digests = file_digests([file for file, _, _ in listed])
    for (_, rel, entry), digest in zip(listed, digests):
        if digest != entry["sha256"]:
            return f"{rel} does not match its checksum"
    return None


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(run_step, folder) of the checkpoint folders under ``root``, newest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found, reverse=True)


def find_resume_checkpoint(root: Path, *, log: Callable[[str], None]) -> Path | None:
    """The newest complete checkpoint under ``root`` (None if there is none). Temporary folders
    of interrupted writes are removed and every skipped folder is reported through ``log``."""
    if root.is_dir():
        for p in sorted(root.iterdir()):
            if p.name.startswith(".") and p.is_dir():
                log(f"removing {p.name}: a checkpoint write that was interrupted")
                shutil.rmtree(p, ignore_errors=True)
    for _, path in list_checkpoints(root):
        reason = verify_checkpoint(path)
        if reason is None:
            return path
        log(f"skipping checkpoint {path.name}: incomplete or damaged ({reason})")
    return None


def prune_checkpoints(root: Path, *, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints. Each is first renamed to a hidden name
    (atomic), so a crash mid-delete leaves a temporary folder, never a half checkpoint under a
    real name."""
    for _, path in list_checkpoints(root)[keep:]:
        doomed = path.with_name(f".{path.name}.deleting")
        os.replace(path, doomed)
        fault_point("prune")
        shutil.rmtree(doomed, ignore_errors=True)
