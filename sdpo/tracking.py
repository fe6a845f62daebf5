"""Experiment trackers: TensorBoard and Weights & Biases, fed with what ``metrics.jsonl`` gets.

``[log] report_to = ["tensorboard", "wandb"]`` (TRL's ``report_to``). Every record the run
appends to ``metrics.jsonl`` (training steps every ``train.log_every``, ``eval/*`` after each
sDPO step) goes to each tracker as scalars at the run's step (the step of the run's checkpoints,
counted on across sDPO steps; a training record's optimizer step within its sDPO step goes to
the trackers as the scalar ``step_in_sdpo_step``, which is its own ``step`` when the optimizer is
reset); at the end of each sDPO step the
step report's ``sdpo/*`` values (gamma_ref of the step's reference on its chunk and on the next,
reward accuracy before and after) follow. Only rank 0 opens trackers. ``metrics.jsonl`` stays
the record of truth; a tracker is a view of it.

Resume (``sdpo train --resume``): the steps after the checkpoint are logged again.
- TensorBoard: the writer opens with ``purge_step`` = the first step after the checkpoint, so
  TensorBoard drops the killed run's events from that step on and every step shows once.
- W&B: the run id is kept in ``OUTPUT_DIR/tracking.json`` and the same run is continued
  (``resume="allow"``). W&B ignores values logged for a step lower than its latest one, so the
  killed run's values stand for the steps it had logged after the checkpoint. Resume is exact,
  so they are the same numbers, apart from ``tokens_per_s``.
A fresh run (or ``--overwrite``) starts a new W&B run and purges the TensorBoard folder's events
from step 0 on. W&B's mode, entity and key come from its own environment (``WANDB_MODE=offline``
runs without a network; ``wandb sync`` uploads later).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from sdpo.engine.files import atomic_write_json

__all__ = [
    "TENSORBOARD_DIR",
    "TRACKING_STATE",
    "TensorBoardTracker",
    "TrackerStartError",
    "Trackers",
    "WandbTracker",
    "missing_tracker_packages",
    "open_trackers",
    "scalars",
]

TRACKING_STATE = "tracking.json"  # the W&B run id, kept for --resume
TENSORBOARD_DIR = "tensorboard"  # default event folder inside the output folder
TENSORBOARD_OWNER = "sdpo_run.json"  # in the event folder: the output folder of its run
_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}


def missing_tracker_packages(names: Sequence[str]) -> list[str]:
    """The trackers in ``names`` whose package cannot be imported, each with its install hint."""
    missing = []
    for name in names:
        module, package = _PACKAGES[name]
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(f"{name} (pip install {package})")
    return missing


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numeric values of a metrics record, without the x-axis ``step``; booleans, strings
    and non-finite values are left out."""
    out = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


class Tracker(Protocol):
    def log(self, values: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class TensorBoardTracker:
    """Scalars into TensorBoard event files (``torch.utils.tensorboard``). The event file is
    made at the first record, so opening the tracker writes nothing (the runner opens the
    trackers before it clears an old run's outputs)."""

    def __init__(self, log_dir: Path, *, purge_step: int, owner: Path | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        def start() -> Any:
            writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)
            if owner is not None:  # whose events the folder holds (``_check_own_events``)
                atomic_write_json(log_dir / TENSORBOARD_OWNER, {"output_dir": str(owner.resolve())})
            return writer

        self._open = start
        self.writer: Any = None

    def log(self, values: dict[str, float], step: int) -> None:
        if self.writer is None:
            self.writer = self._open()
        for key, value in values.items():
            self.writer.add_scalar(key, value, global_step=step)
        # written through at once (a few hundred bytes per record): a killed run loses nothing
        # that metrics.jsonl holds
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class WandbTracker:
    """One W&B run for the whole sDPO run (all steps), continued on resume."""

    def __init__(
        self, *, project: str, name: str, run_id: str, directory: Path, config: dict[str, Any]
    ) -> None:
        import wandb

        created = not directory.exists()
        directory.mkdir(parents=True, exist_ok=True)
        try:
            self.run = wandb.init(
                project=project,
                name=name,
                id=run_id,
                resume="allow",
                dir=str(directory),
                config=config,
            )
        except BaseException:
            if created:  # a run refused before it starts leaves no output folder behind
                with contextlib.suppress(OSError):
                    directory.rmdir()
            raise

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """The trackers of a run (none on ranks other than 0, or without ``log.report_to``)."""

    def __init__(self, trackers: Sequence[Tracker] = ()) -> None:
        self.trackers = list(trackers)

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def log(self, record: dict[str, Any], step: int | None = None) -> None:
        """Log a metrics record at ``step`` (default: the record's own ``step``)."""
        if not self.trackers:
            return
        values = scalars(record)
        at = int(record["step"] if step is None else step)
        for tracker in self.trackers:
            tracker.log(values, at)

    def close(self) -> None:
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.close()


def open_trackers(
    report_to: Sequence[str],
    *,
    output_dir: Path,
    project: str,
    run_name: str | None,
    tensorboard_dir: str | None,
    resume_step: int | None,
    config: dict[str, Any],
) -> Trackers:
    """Open the trackers named in ``report_to`` for the run in ``output_dir``.

    ``resume_step``: the run step of the checkpoint the run resumes from (None: a fresh run,
    or a resume from the beginning). A tracker that cannot start (W&B without a login, say)
    raises :class:`TrackerStartError` naming it, with the trackers opened before it closed and
    ``tracking.json`` as it was."""
    opened: list[Tracker] = []
    name = run_name or output_dir.resolve().name
    try:
        for tracker in report_to:
            try:
                if tracker == "tensorboard":
                    folder = (
                        Path(tensorboard_dir) if tensorboard_dir else output_dir / TENSORBOARD_DIR
                    )
                    start = 0 if resume_step is None else resume_step + 1
                    _check_folder_writable(folder)
                    if tensorboard_dir and resume_step is None:
                        _check_own_events(folder, output_dir)
                    opened.append(TensorBoardTracker(folder, purge_step=start, owner=output_dir))
                elif tracker == "wandb":
                    run_id, fresh = _wandb_run_id(output_dir, fresh=resume_step is None)
                    opened.append(
                        WandbTracker(
                            project=project,
                            name=name,
                            run_id=run_id,
                            directory=output_dir,
                            config=config,
                        )
                    )
                    if fresh:  # kept for --resume once the run has started
                        atomic_write_json(output_dir / TRACKING_STATE, {"wandb_run_id": run_id})
                else:
                    raise ValueError(f"unknown tracker {tracker!r}")
            except TrackerStartError:
                raise
            except Exception as e:
                hint = _START_HINTS.get(tracker, "")
                raise TrackerStartError(
                    f"log.report_to: the {tracker} tracker could not start "
                    f"({type(e).__name__}: {e}){hint}; or leave it out of log.report_to"
                ) from e
    except BaseException:
        Trackers(opened).close()
        raise
    return Trackers(opened)


class TrackerStartError(RuntimeError):
    """A tracker of ``log.report_to`` could not start; the message names it and the way out."""


def _check_folder_writable(folder: Path) -> None:
    """The event folder is made at the first record, after the initial scoring pass: a path
    that cannot become a writable folder is refused now, before anything is written."""
    at = folder
    while not at.exists() and at.parent != at:
        at = at.parent
    if not at.is_dir():
        raise TrackerStartError(
            f"log.tensorboard_dir: {at} is not a folder, so {folder} cannot be made; give a "
            "folder path there"
        )
    if not os.access(at, os.W_OK | os.X_OK):
        raise TrackerStartError(
            f"log.tensorboard_dir: {at} cannot be written, so the event files cannot go to "
            f"{folder}; give a folder this user can write"
        )


def _check_own_events(folder: Path, output_dir: Path) -> None:
    """A fresh run's TensorBoard writer purges the folder's events from step 0 on (TensorBoard
    reads a folder's event files as one run), so a ``log.tensorboard_dir`` that holds another
    run's events would lose them from view: refused, before anything is written."""
    if not any(folder.glob("events.out.tfevents.*")):
        return
    owner = None
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        owner = json.loads((folder / TENSORBOARD_OWNER).read_text(encoding="utf-8"))["output_dir"]
    if owner == str(output_dir.resolve()):
        return
    whose = f"the run in {owner}" if owner else "another run"
    raise TrackerStartError(
        f"log.tensorboard_dir = {folder} holds the TensorBoard events of {whose}; TensorBoard "
        "shows a folder's events as one run, and this fresh run's would hide them: give each "
        f"run its own folder (e.g. {folder / output_dir.resolve().name}, and point TensorBoard "
        f"at {folder}), or leave log.tensorboard_dir unset (OUTPUT_DIR/{TENSORBOARD_DIR})"
    )


_START_HINTS = {
    "wandb": ": log in with `wandb login` or set WANDB_API_KEY, or run with WANDB_MODE=offline "
    "(`wandb sync` uploads later)",
}


def _wandb_run_id(output_dir: Path, *, fresh: bool) -> tuple[str, bool]:
    """The run's W&B id and whether it is new: the id kept in ``tracking.json``, so that
    ``--resume`` continues the same run; a new one for a fresh run (written by the caller
    once W&B has started)."""
    path = output_dir / TRACKING_STATE
    if not fresh and path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8")).get("wandb_run_id")
        if saved:
            return str(saved), False
    return secrets.token_hex(6), True
