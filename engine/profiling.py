"""torch.profiler over chosen optimizer steps of a real training run (``[profile]``).

``StepProfiler`` traces a window of optimizer steps: the trainer calls ``step_begin(n)`` before
optimizer step n of its pass (counted from 1) and ``step_end(n)`` after it. The profiler starts at
the first step of the window it sees (a resume that lands inside the window traces the rest of it)
and stops after the window's last step; each traced step is one ``optimizer step n`` range in
the trace. The device is synchronised at both ends of the window only, so the steps in between
run as they do untraced. At the stop, each rank writes, atomically, into ``out_dir``:

- ``NAME.rankR.trace.json.gz``: the Chrome trace (open it in Perfetto or chrome://tracing);
- ``NAME.rankR.summary.json``: the steps traced, wall time per step, the device's busy time and
  its share of the wall time (CUDA), and the top device kernels and host ops by self time
  (``profile_summary``);
- with ``memory`` on CUDA, ``NAME.rankR.memory.pickle``: the caching allocator's history over the
  window (every allocation and free with its stack), for PyTorch's memory viewer
  (pytorch.org/memory_viz). The history is recorded only inside the window.

A window that is left early (an error, a stop on request) is closed by ``close()`` without
writing anything: a partial trace would be mistaken for the steps asked for.

Out of memory (``profile.memory_on_oom``): ``start_memory_history()`` records the allocator's
history from the start of the run, and the runner writes ``write_memory_snapshot()`` when a
CUDA out-of-memory error ends it: what was allocated at the failure, and by which code.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sdpo.engine import distributed
from sdpo.engine.files import atomic_open, atomic_write_json

# allocations and frees kept by the allocator's history (about 100 MB of host memory at most)
MEMORY_HISTORY_ENTRIES = 200_000
# the name of each traced step's range in the trace: "optimizer step N"
STEP_RANGE = "optimizer step "


def profile_summary(prof: Any, *, steps: int, wall_s: float, top: int = 12) -> dict[str, Any]:
    """What ``steps`` profiled steps spent their time on: the device kernels by self time (and
    the share of the wall time the device was busy), the host ops by self time (where
    synchronisations, allocations and launches show up; the Python frames ``with_stack``
    records are left out). Times are ms per step."""
    kernels, host = [], []
    device_total_us = 0.0
    # with ``with_stack`` the profiler also records every Python frame as an event; those are
    # not ops (their "self time" is whatever their children's events leave, even negative)
    frames = {e.key for e in prof.events() if getattr(e, "is_python_function", False)}
    for evt in prof.key_averages():
        if evt.key in frames:
            continue
        device_us = getattr(evt, "self_device_time_total", None)
        if device_us is None:
            device_us = getattr(evt, "self_cuda_time_total", 0.0)
        on_device = str(getattr(evt, "device_type", "")).endswith("CUDA")
        if evt.key.startswith(STEP_RANGE):  # the window's own step ranges: not an op
            continue
        if on_device:
            device_total_us += device_us
            kernels.append((device_us, evt.count, evt.key))
        else:
            host.append((evt.self_cpu_time_total, evt.count, evt.key))

    def table(items: list[tuple[float, int, str]]) -> list[dict[str, Any]]:
        items.sort(reverse=True)
        return [
            {"name": name[:100], "ms_per_step": us / 1e3 / steps, "calls_per_step": n / steps}
            for us, n, name in items[:top]
        ]

    wall_ms = wall_s * 1e3 / steps
    return {
        "steps": steps,
        "wall_ms_per_step": wall_ms,
        "device_busy_ms_per_step": device_total_us / 1e3 / steps,
        "device_busy_fraction": device_total_us / 1e3 / steps / wall_ms if kernels else None,
        "device_kernels": table(kernels),
        "host_ops": table(host),
    }


class StepProfiler:
    """Trace optimizer steps ``first .. first + steps - 1`` of one training pass (module
    docstring). ``name`` prefixes the files written to ``out_dir``; ``memory``: also record the
    CUDA allocator's history (ignored off CUDA, with a note through ``log``); ``with_stack``:
    Python stacks in the trace (larger files, more overhead); ``history_running``: the
    allocator's history is already recorded for the whole run."""

    def __init__(
        self,
        *,
        out_dir: str | os.PathLike,
        name: str,
        first: int,
        steps: int,
        device: torch.device,
        memory: bool = False,
        with_stack: bool = False,
        history_running: bool = False,
        log: Callable[[str], None] = print,
    ) -> None:
        if first < 1 or steps < 1:
            raise ValueError(
                f"a profile window needs first >= 1 and steps >= 1, got {first}, {steps}"
            )
        self.out_dir = Path(out_dir)
        self.name = name
        self.first, self.last = first, first + steps - 1
        self.device = torch.device(device)
        self.with_stack = with_stack
        # the allocator's history is recorded for the whole run already (out-of-memory
        # snapshots): the window neither starts nor stops it, and its snapshot holds it all
        self.history_running = history_running
        self.log = log
        self.memory = memory and self.device.type == "cuda"
        if memory and not self.memory:
            log(
                f"profile.memory records the CUDA allocator: nothing to record on {self.device.type}"
            )
        self.traced: list[int] = []
        self.files: list[Path] = []
        self._prof: torch.profiler.profile | None = None
        self._range: Any = None
        self._start = 0.0

    @property
    def active(self) -> bool:
        return self._prof is not None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step_begin(self, step: int) -> None:
        """Before optimizer step ``step``: start the profiler at the window's first step seen."""
        if not self.first <= step <= self.last:
            return
        if self._prof is None:
            if self.traced:  # the window was traced already (a second pass over the data)
                return
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._sync()
            if self.memory and not self.history_running:
                start_memory_history()
            self._prof = torch.profiler.profile(
                activities=activities, record_shapes=True, with_stack=self.with_stack
            )
            self._prof.start()
            self._start = time.perf_counter()
        self._range = torch.profiler.record_function(f"{STEP_RANGE}{step}")
        self._range.__enter__()

    def step_end(self, step: int) -> None:
        """After optimizer step ``step``: at the window's last step, stop and write the files."""
        if self._prof is None or not self.first <= step <= self.last:
            return
        self._range.__exit__(None, None, None)
        self._range = None
        self.traced.append(step)
        if step == self.last:
            self._finish()

    def close(self) -> None:
        """Stop a window left early, writing nothing (module docstring)."""
        if self._prof is None:
            return
        if self._range is not None:
            self._range.__exit__(None, None, None)
            self._range = None
        self._prof.stop()
        self._prof = None
        if self.memory and not self.history_running:
            stop_memory_history()
        self.traced = []

    def _finish(self) -> None:
        self._sync()
        wall_s = time.perf_counter() - self._start
        prof, self._prof = self._prof, None
        prof.stop()
        try:
            table = profile_summary(prof, steps=len(self.traced), wall_s=wall_s)
        except Exception as e:  # torch's reading of its own events (seen with with_stack)
            table = {
                "steps": len(self.traced),
                "wall_ms_per_step": wall_s * 1e3 / len(self.traced),
                "device_busy_fraction": None,
                "error": f"torch.profiler could not read its events: {type(e).__name__}: {e}",
            }
            self.log(f"profile: no op tables in the summary ({table['error']}); the trace is kept")
        stem = self.out_dir / f"{self.name}.rank{distributed.rank()}"
        if self.memory:
            self.files.append(write_memory_snapshot(f"{stem}.memory.pickle"))
            if not self.history_running:
                stop_memory_history()
        trace = Path(f"{stem}.trace.json.gz")
        with tempfile.TemporaryDirectory(prefix="sdpo-trace-") as tmp:
            raw = Path(tmp) / "trace.json"
            prof.export_chrome_trace(str(raw))
            with (
                raw.open("rb") as src,
                atomic_open(trace) as f,
                gzip.GzipFile("", "wb", fileobj=f) as z,
            ):
                shutil.copyfileobj(src, z)
        self.files.append(trace)
        summary = {
            "name": self.name,
            "rank": distributed.rank(),
            "device": str(self.device),
            "traced_steps": list(self.traced),
            **table,
        }
        path = Path(f"{stem}.summary.json")
        atomic_write_json(path, summary)
        self.files.append(path)
        busy = summary["device_busy_fraction"]
        self.log(
            f"profile: optimizer steps {self.traced[0]}-{self.traced[-1]} traced, "
            f"{summary['wall_ms_per_step']:.1f} ms per step"
            + (f", device busy {busy:.0%} of it" if busy is not None else "")
            + f": {trace}"
        )


def start_memory_history() -> None:
    """Record every CUDA allocation and free (with its Python stack) from now on, the newest
    ``MEMORY_HISTORY_ENTRIES`` kept."""
    torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_ENTRIES, stacks="python")


def stop_memory_history() -> None:
    torch.cuda.memory._record_memory_history(enabled=None)


def write_memory_snapshot(path: str | os.PathLike) -> Path:
    """The CUDA allocator's state and recorded history, pickled as
    ``torch.cuda.memory._dump_snapshot`` writes it (for pytorch.org/memory_viz), atomically."""
    import pickle

    path = Path(path)
    with atomic_open(path) as f:
        pickle.dump(torch.cuda.memory._snapshot(), f)
    return path
