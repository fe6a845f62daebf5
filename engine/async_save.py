"""Checkpoint writes off the training thread (``train.async_save``, torchtitan's
``checkpoint.async_mode``): a host snapshot and one background writer thread.

Writing a checkpoint (safetensors shards, the optimizer state, the sha256 of every file, fsync,
rename) costs seconds to minutes for a large model, time in which the accelerators would idle.
With async saves the training thread only copies what the checkpoint holds into host memory
(``HostSnapshot``: pinned buffers when the tensors are on a GPU, reused from save to save) and
hands a write function that reads nothing but that copy to ``BackgroundWriter``; training goes
on while the writer thread writes.

The rules a caller (``sdpo.runner``) keeps:

- One write in flight: ``wait()`` for the previous write before taking the next snapshot. The
  snapshot's host buffers are then free to be reused, and checkpoints complete in order (so
  pruning old ones after a new one is complete stays correct).
- Errors are never lost: a failed write's exception is raised by the next ``wait()``, in the
  waiting thread, exactly once. Every path out of a run (its end, an exception, a stop) waits.
- ``done(result)`` of a write runs in the waiting thread, after the write finished: state the
  training thread keeps (e.g. the checksums of a step folder just written) is set there, never
  from the writer thread.

Test hook: a fault point named with the action ``HOLD`` in ``SDPO_FAULT_AT``
(``sdpo.engine.resume.fault_point``), e.g. ``"ckpt_write:2:HOLD"``, stops the writer thread
there until the training thread waits for that write (its next save, or the run's end): a test
can see training change the weights while a write is in flight, deterministically.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sdpo.engine.resume import holds_released_by


class HostSnapshot:
    """Host copies of state that training goes on changing (weights, optimizer state).

    ``copy(obj, key=...)`` returns ``obj`` (nested dicts, lists and tuples of tensors and plain
    values) with every tensor copied into a host buffer named by its key path (``key/name``)
    and every other value deep-copied. A buffer is reused by the next copy under the same path
    when shape and dtype match, so a long run allocates its snapshot memory once; copies from a
    GPU go to pinned buffers, asynchronously, and ``ready()`` waits for them. The caller must
    not copy again while a write still reads the previous copy (one write in flight)."""

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}
        # the GPUs copied from since the last ready(): each copy runs on its source GPU's
        # stream, which need not be the current device's
        self._copying_from: set[torch.device] = set()

    @property
    def nbytes(self) -> int:
        """Host memory held by the buffers."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def copy(self, obj: Any, *, key: str) -> Any:
        # the memo keeps shared objects shared (as deepcopy does), so torch.save pickles the
        # copy to the same bytes as the original
        return self._copy(obj, key, {})

    def _copy(self, obj: Any, key: str, memo: dict[int, Any]) -> Any:
        if id(obj) in memo:
            return memo[id(obj)]
        if isinstance(obj, Tensor):
            out = self._copy_tensor(obj, key)
        elif isinstance(obj, dict):
            out = {k: self._copy(v, f"{key}/{k}", memo) for k, v in obj.items()}
        elif isinstance(obj, list | tuple):
            items = [self._copy(v, f"{key}/{i}", memo) for i, v in enumerate(obj)]
            out = items if isinstance(obj, list) else tuple(items)
        else:
            return copy.deepcopy(obj, memo)
        memo[id(obj)] = out
        return out

    def _copy_tensor(self, t: Tensor, key: str) -> Tensor:
        t = t.detach()
        pin = t.is_cuda
        buf = self._buffers.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype or buf.is_pinned() != pin:
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=pin)
            self._buffers[key] = buf
        buf.copy_(t, non_blocking=pin)
        if pin:
            self._copying_from.add(t.device)
        return buf

    def ready(self) -> None:
        """Wait for the copies from a GPU (asynchronous into pinned memory) to land: a D2H copy
        runs on its source GPU's stream, so each GPU copied from is waited for, whichever
        device is current."""
        while self._copying_from:
            torch.cuda.synchronize(self._copying_from.pop())


@dataclass
class _Write:
    future: Future
    done: Callable[[Any], None] | None
    waited_for: threading.Event  # releases a HOLD fault point (test hook)


class BackgroundWriter:
    """One background thread that runs one write at a time (module docstring)."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdpo-checkpoint-writer")
        self._pending: _Write | None = None

    @property
    def busy(self) -> bool:
        """A write was submitted and not yet waited for."""
        return self._pending is not None

    def submit(
        self, write: Callable[[], Any], *, done: Callable[[Any], None] | None = None
    ) -> None:
        """Start ``write()`` in the writer thread; ``done(result)`` runs in the thread that
        waits for it. The previous write must have been waited for."""
        if self._pending is not None:
            raise RuntimeError("BackgroundWriter.submit: wait() for the previous write first")
        waited_for = threading.Event()

        def run() -> Any:
            with holds_released_by(waited_for):
                return write()

        self._pending = _Write(self._pool.submit(run), done, waited_for)

    def wait(self) -> None:
        """Block until the pending write (if any) has finished, run its ``done`` here and raise
        its exception here (once)."""
        job = self._pending
        if job is None:
            return
        job.waited_for.set()
        try:
            result = job.future.result()
        except BaseException:
            if job.future.done():  # the write's own error; an interrupted wait keeps it pending
                self._pending = None
            raise
        self._pending = None
        if job.done is not None:
            job.done(result)

    def close(self) -> None:
        """Stop the thread (after the pending write, which should have been waited for)."""
        if self._pending is not None:
            self._pending.waited_for.set()
        self._pool.shutdown(wait=True)
