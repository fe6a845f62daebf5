"""Step reports of an sDPO run: what each step trained on and what it changed.

Per step the final DPO metrics, the mean gamma_ref (reference log-ratio
log pi_ref(chosen|x) - log pi_ref(rejected|x)) of the step's reference on its own chunk and on
the next chunk (the paper's Figure 2 quantity: how much one step raises the bound for the next),
and the reward accuracy on the chunk before and after training. This module formats them as a
table, writes ``sdpo_report.json`` and draws a PNG from ``metrics.jsonl`` when matplotlib is
installed (an optional extra). It never touches a model.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from sdpo.engine.files import atomic_open, atomic_write_json

__all__ = [
    "PLOT_HINT",
    "REPORT_FILE",
    "StepReport",
    "format_summary_table",
    "plot_steps",
    "read_metrics",
    "read_reports",
    "write_reports",
]

REPORT_FILE = "sdpo_report.json"
PLOT_HINT = "no plot written: matplotlib is not installed; install the `plot` extra: pip install 'sdpo[plot]'"
_REPORT_VERSION = 1


@dataclass(kw_only=True)
class StepReport:
    step: int  # 1-based sDPO step
    num_pairs: int
    # the chunk's sources: names, or source -> number of its pairs in the chunk
    sources: list[str] | dict[str, int]
    beta: float
    learning_rate: float
    train_metrics: dict[str, float] = field(default_factory=dict)  # last logged values
    gamma_ref_chunk: float  # mean gamma of this step's reference on this step's chunk
    gamma_ref_next_chunk: float | None = None  # same reference on the next chunk; None: last step
    reward_accuracy_before: float  # share of the chunk with gamma > 0 under the reference
    reward_accuracy_after: float | None = None  # same share under the model after this step
    # held-out data (data.eval_sources) after this step, rewards against the initial model
    eval_metrics: dict[str, float] | None = None
    train_seconds: float = 0.0
    scoring_seconds: float = 0.0  # reference scoring of this step (and its next-chunk gamma)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StepReport:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def _fmt(value: float | None, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def _sources_cell(sources: list[str] | dict[str, int], limit: int = 3) -> str:
    if isinstance(sources, dict):
        items = [f"{s}:{n}" for s, n in sources.items()]
    else:
        items = [str(s) for s in sources]
    if len(items) > limit:
        items = items[:limit] + [f"+{len(items) - limit} more"]
    return " ".join(items) or "-"


def format_summary_table(reports: Sequence[StepReport]) -> str:
    """An aligned text table, one row per step, plus one line per step boundary saying how much
    the new reference raised gamma_ref on the next chunk."""
    header = [
        "step",
        "pairs",
        "sources",
        "beta",
        "lr",
        "loss",
        "reward acc",
        "margin",
        "gamma_ref",
        "gamma_ref next",
        "acc before",
        "acc after",
        "train s",
        "score s",
    ]
    rows = []
    for r in reports:
        m = r.train_metrics
        rows.append(
            [
                str(r.step),
                str(r.num_pairs),
                _sources_cell(r.sources),
                _fmt(r.beta, "g"),
                _fmt(r.learning_rate, ".2e"),
                _fmt(m.get("loss"), ".4f"),
                _fmt(m.get("rewards/accuracies"), ".3f"),
                _fmt(m.get("rewards/margins"), ".4f"),
                _fmt(r.gamma_ref_chunk, ".3f"),
                _fmt(r.gamma_ref_next_chunk, ".3f"),
                _fmt(r.reward_accuracy_before, ".3f"),
                _fmt(r.reward_accuracy_after, ".3f"),
                _fmt(r.train_seconds, ".1f"),
                _fmt(r.scoring_seconds, ".1f"),
            ]
        )
    if any(r.eval_metrics for r in reports):  # held-out data, when the run has some
        header += ["eval loss", "eval pref acc"]
        for r, row in zip(reports, rows):
            e = r.eval_metrics or {}
            row += [_fmt(e.get("eval/loss"), ".4f"), _fmt(e.get("eval/preference_accuracy"), ".3f")]
    widths = [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        # Text columns left-aligned, numbers right-aligned.
        return "  ".join(
            c.ljust(w) if i == 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    out = [line(header), "  ".join("-" * w for w in widths)]
    out += [line(row) for row in rows]
    by_step = {r.step: r for r in reports}
    for r in reports:
        nxt = by_step.get(r.step + 1)
        if nxt is None or r.gamma_ref_next_chunk is None:
            continue
        # a non-finite gamma is null in sdpo_report.json (None read back): shown as "-"
        rise = None
        if nxt.gamma_ref_chunk is not None:
            rise = nxt.gamma_ref_chunk - r.gamma_ref_next_chunk
        out.append(
            f"gamma_ref on chunk {nxt.step}: reference of step {r.step} "
            f"{_fmt(r.gamma_ref_next_chunk, '.3f')} -> reference of step {nxt.step} "
            f"{_fmt(nxt.gamma_ref_chunk, '.3f')} ({_fmt(rise, '+.3f')})"
        )
    return "\n".join(out)


def write_reports(
    reports: Sequence[StepReport],
    out_dir: str | os.PathLike,
    *,
    partition: Any | None = None,
    held_out: dict[str, Any] | None = None,
) -> Path:
    """Write ``out_dir/sdpo_report.json`` atomically; ``partition`` (a PartitionReport) and
    ``held_out`` (the held-out pairs' account) are included when given. Returns the path
    written."""
    path = Path(out_dir) / REPORT_FILE
    doc: dict[str, Any] = {"version": _REPORT_VERSION, "steps": [r.to_dict() for r in reports]}
    if partition is not None:
        doc["partition"] = partition.to_dict()
    if held_out is not None:
        doc["held_out"] = held_out
    atomic_write_json(path, _finite_or_none(doc))
    return path


def read_reports(out_dir: str | os.PathLike) -> list[StepReport]:
    """The step reports of ``out_dir/sdpo_report.json`` (e.g. to continue a resumed run)."""
    path = Path(out_dir) / REPORT_FILE
    doc = json.loads(path.read_text(encoding="utf-8"))
    return [StepReport.from_dict(d) for d in doc.get("steps", [])]


def _finite_or_none(obj: Any) -> Any:
    """NaN/inf are not JSON; write them as null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite_or_none(v) for v in obj]
    return obj


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The JSON objects of a metrics.jsonl file. A torn last line (a run killed mid-write) is
    skipped silently; an unreadable line elsewhere is skipped with a warning. A missing file
    gives an empty list."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    lines = text.split("\n")
    records = []
    for n, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            is_last = all(not rest.strip() for rest in lines[n:])
            if not is_last:
                warnings.warn(f"{path}: line {n} is not a JSON object; skipped", stacklevel=2)
            continue
        records.append(obj)
    return records


def _training_curve(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[float]]:
    """Training records with a global x (optimizer step across all sDPO steps) under "_x", and
    the x positions of the step boundaries.

    The x is a record's ``run_step`` (the run's step, which the trackers use too). Records
    written without it (older runs) get one from ``step``, whether it counts globally or
    restarts in each sDPO step. A repeated x keeps only its last record (a resumed run logs
    some steps twice)."""
    train = [r for r in records if "step" in r and "loss" in r]
    if train and all(isinstance(r.get("run_step"), int) for r in train):
        last = {}
        for r in train:
            last[r["run_step"]] = r
        curve, boundaries = [], []
        for x in sorted(last):
            r = last[x]
            if curve and r.get("sdpo_step", 1) != curve[-1].get("sdpo_step", 1):
                boundaries.append(curve[-1]["_x"] + 0.5)
            curve.append({**r, "_x": x})
        return curve, boundaries
    by_step: dict[tuple[int, int], dict[str, Any]] = {}
    for r in train:
        try:
            by_step[(int(r.get("sdpo_step", 1)), int(r["step"]))] = r
        except (TypeError, ValueError):
            continue
    keys = sorted(by_step)
    curve, boundaries = [], []
    offset = 0
    prev_sdpo, prev_x = None, None
    for sdpo_step, step in keys:
        if prev_sdpo is not None and sdpo_step != prev_sdpo:
            if step + offset <= prev_x:  # the step counter restarted: continue after the last x
                offset = prev_x - step + 1
            boundaries.append(prev_x + 0.5)
        x = step + offset
        curve.append({**by_step[(sdpo_step, step)], "_x": x})
        prev_sdpo, prev_x = sdpo_step, x
    return curve, boundaries


def _eval_curve(records: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """The held-out records' values by metric name (``eval/loss`` → ``"loss"``), as
    ``(run_step, value)`` points in step order. Records without ``run_step`` (older runs) are left
    out; a repeated run step (a resumed run) keeps its last record."""
    last: dict[int, dict[str, Any]] = {}
    for r in records:
        x = r.get("run_step")
        if isinstance(x, int) and any(k.startswith("eval/") for k in r):
            last[x] = r
    out: dict[str, list[tuple[int, float]]] = {}
    for x in sorted(last):
        for key, value in last[x].items():
            if key.startswith("eval/") and isinstance(value, int | float):
                out.setdefault(key.removeprefix("eval/"), []).append((x, float(value)))
    return out


def _import_matplotlib() -> tuple[Any, Any] | None:
    try:
        import matplotlib  # noqa: F401  (imported first so a missing package is detected here)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure, FigureCanvasAgg


def plot_steps(
    metrics_jsonl_path: str | os.PathLike,
    reports: Sequence[StepReport],
    out_png: str | os.PathLike,
) -> bool:
    """Draw loss, rewards/accuracies and rewards/margins across optimizer steps (sDPO step
    boundaries marked; the held-out values as points where the run holds pairs out,
    ``data.eval_sources`` or ``data.eval_fraction``) and gamma_ref per step into ``out_png``.
    Returns False, writing nothing, when matplotlib is not installed (print :data:`PLOT_HINT`
    then)."""
    mpl = _import_matplotlib()
    if mpl is None:
        return False
    fig = _draw_steps(mpl, read_metrics(metrics_jsonl_path), reports)
    with atomic_open(out_png, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    return True


# The figure's layout, fixed before drawing. Constrained layout measured every text of the
# figure twice and drew it once more before saving, about half of a plot's time; here the
# margins come from the font sizes and tick lengths the axes hold (so a matplotlibrc with other
# sizes still fits), and the width of the tick labels, which depends on the data, from their
# strings. All in points (1/72 inch).
_FIG_SIZE = (11.0, 7.5)  # inches
_EDGE = 6.0  # between the outermost text and the figure's edge or the next panel
_TITLE_PAD = 6.0  # between the axes' top and the title's baseline
_LINE = 1.25  # a text line's height over its font size (DejaVu Sans: 1.17)
# An upper bound of a digit's advance over the font size: DejaVu Sans digits are 0.64 em, its
# minus sign 0.84 em and its point 0.32 em.
_CHAR_WIDTH = 0.7


def _tick_labels_width(axis: Any) -> float:
    """Points the widest tick label of ``axis`` takes, from its string: the labels the axis
    will draw at its current limits (measuring rendered text would cost a layout pass)."""
    labels = axis.get_major_formatter().format_ticks(axis.get_majorticklocs())
    size = axis.get_major_ticks()[0].label1.get_fontsize()
    return max((len(t) for t in labels), default=1) * _CHAR_WIDTH * size


def _place_axes(fig: Any, axes: Any) -> None:
    """Put the 2x2 ``axes`` into equal cells with room for their titles, x labels and tick
    labels (each column indented by its widest y tick labels), so nothing the axes draw reaches
    past the figure or into a neighbour."""
    width, height = (v * 72.0 for v in fig.get_size_inches())
    ax = axes[0, 0]
    x_tick, y_tick = ax.xaxis.get_major_ticks()[0], ax.yaxis.get_major_ticks()[0]
    top = _EDGE + _LINE * ax.title.get_fontsize() + _TITLE_PAD
    bottom = (
        _EDGE
        + _LINE * (ax.xaxis.label.get_fontsize() + x_tick.label1.get_fontsize())
        + ax.xaxis.labelpad
        + x_tick.get_tick_padding()
        + x_tick.get_pad()
    )
    y_tick_space = y_tick.get_tick_padding() + y_tick.get_pad()

    def place(pads: list[float], right: float, tops: list[float]) -> None:
        ax_w = (width - sum(pads) - 2 * right) / 2
        ax_h = (height - sum(tops) - 2 * bottom) / 2
        for r, y0 in enumerate([height - tops[0] - ax_h, bottom]):
            x0 = pads[0]
            for c in range(2):
                if c:
                    x0 += ax_w + right + pads[1]
                axes[r, c].set_position([x0 / width, y0 / height, ax_w / width, ax_h / height])

    for ax in axes.flat:
        # no offset: the tick labels carry the whole value (a multiplier such as "1e6" stays)
        ax.ticklabel_format(axis="y", useOffset=False)
    place([50.0, 50.0], 20.0, [top, top])  # the final height first: the y ticks depend on it
    pads = [
        _EDGE + y_tick_space + max(_tick_labels_width(ax.yaxis) for ax in axes[:, c])
        for c in range(2)
    ]
    # the last x tick label may be centred on the axes' right edge
    right = _EDGE + max(_tick_labels_width(ax.xaxis) for ax in axes.flat) / 2
    # A y axis' multiplier sits above its top left corner; a row with one has its titles a line
    # higher. The title's automatic placement would do the same, but it measures every y tick
    # label once more for it, and the lifted title would not be in this layout.
    lifts = [
        _LINE * y_tick.label1.get_fontsize()
        if any(ax.yaxis.get_major_formatter().get_offset() for ax in axes[r])
        else 0.0
        for r in range(2)
    ]
    for r in range(2):
        for ax in axes[r]:
            ax.set_title(ax.get_title(), y=1.0, pad=_TITLE_PAD + lifts[r])
    place(pads, right, [top + lift for lift in lifts])


def _draw_steps(mpl: tuple[Any, Any], records: list[dict[str, Any]], reports: Sequence[StepReport]):
    """The figure :func:`plot_steps` saves."""
    Figure, FigureCanvasAgg = mpl
    curve, boundaries = _training_curve(records)
    held_out = _eval_curve(records)

    # The Figure API (not pyplot) keeps the caller's global matplotlib state untouched.
    fig = Figure(figsize=_FIG_SIZE)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    panels = [
        ("loss", "training loss"),
        ("rewards/accuracies", "reward accuracy (batch)"),
        ("rewards/margins", "reward margin (batch)"),
    ]
    for ax, (name, title) in zip(axes.flat, panels):
        pts = [
            (r["_x"], r[name], r.get("sdpo_step", 1))
            for r in curve
            if isinstance(r.get(name), int | float)
        ]
        # One line per sDPO step, so the curve is not drawn across a step boundary.
        for seg in dict.fromkeys(p[2] for p in pts):
            xs_ys = [(p[0], p[1]) for p in pts if p[2] == seg]
            # a step with one logged record is a point: a line through one point draws nothing
            marker = "o" if len(xs_ys) == 1 else None
            ax.plot(
                [x for x, _ in xs_ys],
                [y for _, y in xs_ys],
                color="C0",
                lw=1.2,
                marker=marker,
                ms=4,
            )
        # held-out rewards are against the initial model (one yardstick for every step), the
        # training ones against each step's reference: points, not joined to the training line
        if held_out.get(name):
            ax.plot(
                [x for x, _ in held_out[name]],
                [y for _, y in held_out[name]],
                "o",
                color="C1",
                ms=4,
                label="held-out (vs initial model)",
            )
            ax.legend(fontsize=8)
        if not pts and not held_out.get(name):
            ax.text(
                0.5, 0.5, f"no '{name}' logged", ha="center", va="center", transform=ax.transAxes
            )
        for b in boundaries:
            ax.axvline(b, color="gray", ls="--", lw=0.8)
        ax.set_title(title)
        ax.set_xlabel("optimizer step (dashed: sDPO step boundary)")
        ax.grid(alpha=0.3)

    ax = axes.flat[3]
    steps = [r.step for r in reports]
    if steps:
        ax.plot(steps, [r.gamma_ref_chunk for r in reports], "o-", label="reference on its chunk")
        nxt = [
            (r.step + 1, r.gamma_ref_next_chunk)
            for r in reports
            if r.gamma_ref_next_chunk is not None
        ]
        if nxt:
            ax.plot(
                [p[0] for p in nxt],
                [p[1] for p in nxt],
                "s--",
                label="previous step's reference on that chunk",
            )
        ax.set_xticks(steps)
        ax.legend(fontsize=8)
    ax.set_title("mean gamma_ref per sDPO step")
    ax.set_xlabel("sDPO step (chunk)")
    ax.grid(alpha=0.3)
    _place_axes(fig, axes)
    return fig
