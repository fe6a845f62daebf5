"""Step reports: the summary table carries the numbers, the JSON report round-trips, metrics are
read tolerantly, and the plot is drawn with matplotlib or skipped cleanly without it."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest

from sdpo.partition import describe_partition, partition_given
from sdpo.report import (
    PLOT_HINT,
    REPORT_FILE,
    StepReport,
    _training_curve,
    format_summary_table,
    plot_steps,
    read_metrics,
    read_reports,
    write_reports,
)


def random_reports(steps: int, *, seed: int) -> list[StepReport]:
    rng = np.random.default_rng(seed)
    out = []
    for t in range(1, steps + 1):
        out.append(
            StepReport(
                step=t,
                num_pairs=int(rng.integers(10, 999)),
                sources={f"src{t}": int(rng.integers(1, 99))},
                beta=float(rng.choice([0.1, 0.05, 0.2])),
                learning_rate=float(rng.uniform(1e-7, 1e-5)),
                train_metrics={
                    "loss": float(rng.uniform(0.1, 0.7)),
                    "rewards/accuracies": float(rng.uniform(0.4, 1.0)),
                    "rewards/margins": float(rng.normal()),
                },
                gamma_ref_chunk=float(rng.normal(-30, 10)),
                gamma_ref_next_chunk=float(rng.normal(-40, 10)) if t < steps else None,
                reward_accuracy_before=float(rng.uniform(0, 1)),
                reward_accuracy_after=float(rng.uniform(0, 1)),
                train_seconds=float(rng.uniform(1, 500)),
                scoring_seconds=float(rng.uniform(1, 50)),
            )
        )
    return out


def test_summary_table_contains_each_steps_numbers_in_aligned_rows():
    reports = random_reports(3, seed=0)
    table = format_summary_table(reports)
    lines = table.splitlines()
    rows = lines[:5]  # header, rule, three steps
    assert len({len(line) for line in rows}) == 1, table
    for r, line in zip(reports, rows[2:]):
        cells = line.split()
        assert cells[0] == str(r.step) and cells[1] == str(r.num_pairs)
        for text in (
            f"{r.train_metrics['loss']:.4f}",
            f"{r.train_metrics['rewards/accuracies']:.3f}",
            f"{r.train_metrics['rewards/margins']:.4f}",
            f"{r.gamma_ref_chunk:.3f}",
            f"{r.reward_accuracy_before:.3f}",
            f"{r.reward_accuracy_after:.3f}",
            f"{r.learning_rate:.2e}",
            f"{r.train_seconds:.1f}",
            f"src{r.step}:{r.sources[f'src{r.step}']}",
        ):
            assert text in cells, (text, line)
    assert rows[4].split()[9] == "-"  # no next chunk after the last step


def test_summary_table_states_how_much_each_new_reference_raised_gamma_ref():
    reports = random_reports(3, seed=1)
    lines = format_summary_table(reports).splitlines()[5:]
    assert len(lines) == 2
    for r, nxt, line in zip(reports, reports[1:], lines):
        rise = nxt.gamma_ref_chunk - r.gamma_ref_next_chunk  # float64 truth
        assert line.startswith(f"gamma_ref on chunk {nxt.step}:")
        assert f"{r.gamma_ref_next_chunk:.3f} -> reference of step {nxt.step}" in line
        assert line.endswith(f"({rise:+.3f})")


def test_summary_table_shows_missing_values_as_dashes():
    r = random_reports(1, seed=2)[0]
    r.train_metrics = {}
    r.reward_accuracy_after = None
    r.gamma_ref_chunk = math.nan
    cells = format_summary_table([r]).splitlines()[2].split()
    assert cells[5:9] == ["-", "-", "-", "-"]
    assert cells[11] == "-"


def test_summary_table_of_reports_read_back_with_a_non_finite_gamma(tmp_path):
    reports = random_reports(3, seed=8)
    reports[1].gamma_ref_chunk = math.nan  # written as null, read back as None
    write_reports(reports, tmp_path)
    back = read_reports(tmp_path)
    assert back[1].gamma_ref_chunk is None
    lines = format_summary_table(back).splitlines()
    assert lines[3].split()[8] == "-"
    r0, r2 = back[0], back[2]
    assert lines[-2:] == [
        f"gamma_ref on chunk 2: reference of step 1 {r0.gamma_ref_next_chunk:.3f} -> "
        "reference of step 2 - (-)",
        f"gamma_ref on chunk 3: reference of step 2 {back[1].gamma_ref_next_chunk:.3f} -> "
        f"reference of step 3 {r2.gamma_ref_chunk:.3f} "
        f"({r2.gamma_ref_chunk - back[1].gamma_ref_next_chunk:+.3f})",
    ]
    assert format_summary_table([]).splitlines()[0].split()[:2] == ["step", "pairs"]


def test_write_reports_round_trips_and_includes_the_partition(tmp_path):
    reports = random_reports(2, seed=3)
    reports[1].train_metrics["loss"] = math.nan  # not JSON: written as null
    pairs_sources = ["a", "b", "a", "b", "b"]
    chunks = partition_given(pairs_sources=pairs_sources, pair_indices=range(5), steps=2)
    partition = describe_partition(
        "given", chunks, pairs_sources=pairs_sources, pair_indices=range(5), gamma=[1, -1, 2, 3, -2]
    )
    path = write_reports(reports, tmp_path / "run", partition=partition)
    assert path == tmp_path / "run" / REPORT_FILE
    doc = json.loads(path.read_text())
    assert doc["partition"]["chunks"][1]["sources"] == {"b": 3}
    assert doc["steps"][1]["train_metrics"]["loss"] is None
    back = read_reports(tmp_path / "run")
    assert back[0] == reports[0]
    assert back[1].gamma_ref_next_chunk is None
    assert sorted(p.name for p in path.parent.iterdir()) == [REPORT_FILE]  # no temp files


def write_metrics(path, *, restart_counter: bool, torn: bool) -> list[dict]:
    rng = np.random.default_rng(4)
    records = []
    for sdpo_step, n in ((1, 7), (2, 5)):
        for k in range(1, n + 1):
            step = k if restart_counter else k + (7 if sdpo_step == 2 else 0)
            records.append(
                {
                    "sdpo_step": sdpo_step,
                    "step": step,
                    "loss": float(rng.uniform(0.2, 0.7)),
                    "rewards/accuracies": float(rng.uniform(0, 1)),
                    "rewards/margins": float(rng.normal()),
                    "tokens_per_s": 1000.0,
                }
            )
    text = "".join(json.dumps(r) + "\n" for r in records)
    if torn:
        text += '{"sdpo_step": 2, "step": 6, "lo'
    path.write_text(text)
    return records


def test_read_metrics_skips_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = write_metrics(path, restart_counter=False, torn=True)
    assert read_metrics(path) == records
    assert read_metrics(tmp_path / "absent.jsonl") == []


def test_read_metrics_warns_about_a_damaged_middle_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\nnot json\n{"step": 2, "loss": 0.4}\n')
    with pytest.warns(UserWarning, match="line 2"):
        records = read_metrics(path)
    assert [r["step"] for r in records] == [1, 2]


@pytest.mark.parametrize("restart_counter", [False, True])
def test_training_curve_is_continuous_across_sdpo_steps(tmp_path, restart_counter):
    path = tmp_path / "metrics.jsonl"
    write_metrics(path, restart_counter=restart_counter, torn=True)
    records = read_metrics(path)
    records.append(dict(records[3]))  # a resumed run logged step 4 twice
    records[-1]["loss"] = 0.123
    curve, boundaries = _training_curve(records)
    assert [r["_x"] for r in curve] == list(range(1, 13))
    assert boundaries == [7.5]
    assert curve[3]["loss"] == 0.123  # the last record of a repeated step wins


def test_training_curve_puts_every_record_at_its_run_step_with_log_every():
    # as a run with train.log_every = 2 writes them: sDPO step 1 has 3 optimizer steps
    # (records at 2 and 3), step 2 has 5 (records at 2, 4, 5 of the step; run steps 5, 7, 8);
    # held-out records in between, and a resumed run's repeat of run step 7
    records = []
    for sdpo_step, base, steps in ((1, 0, (2, 3)), (2, 3, (2, 4, 5))):
        for step in steps:
            records.append(
                {"sdpo_step": sdpo_step, "step": step, "run_step": base + step, "loss": 0.5}
            )
        end = base + steps[-1]
        records.append({"sdpo_step": sdpo_step, "step": end, "run_step": end, "eval/loss": 0.6})
    records.append({**records[-3], "loss": 0.123})
    curve, boundaries = _training_curve(records)
    assert [r["_x"] for r in curve] == [2, 3, 5, 7, 8]  # the trackers' x-axis
    assert boundaries == [3.5]
    assert curve[3]["loss"] == 0.123  # the last record of a repeated step wins


def test_plot_is_written_when_matplotlib_is_installed(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib (the `plot` extra) is not installed")
    metrics = tmp_path / "metrics.jsonl"
    write_metrics(metrics, restart_counter=True, torn=True)
    out = tmp_path / "plots" / "sdpo_steps.png"
    assert plot_steps(metrics, random_reports(2, seed=5), out) is True
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]


def test_plot_returns_false_and_writes_nothing_without_matplotlib(tmp_path, monkeypatch):
    # A None entry in sys.modules makes `import matplotlib` raise ImportError.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    metrics = tmp_path / "metrics.jsonl"
    write_metrics(metrics, restart_counter=False, torn=False)
    out = tmp_path / "sdpo_steps.png"
    assert plot_steps(metrics, random_reports(2, seed=6), out) is False
    assert not out.exists()
    assert "pip install 'sdpo[plot]'" in PLOT_HINT


def test_plot_draws_the_held_out_values_at_their_run_steps():
    mpl = pytest.importorskip("matplotlib", reason="matplotlib (the `plot` extra) is not installed")
    del mpl
    from sdpo.report import _draw_steps, _eval_curve, _import_matplotlib

    records = [
        {"sdpo_step": 1, "step": 1, "run_step": 1, "loss": 0.69},
        {"sdpo_step": 1, "step": 2, "run_step": 2, "loss": 0.6},
        {"sdpo_step": 1, "step": 2, "run_step": 2, "eval/loss": 0.65, "eval/rewards/margins": 0.1},
        {"sdpo_step": 2, "step": 4, "run_step": 4, "loss": 0.5},
        {"sdpo_step": 2, "step": 4, "run_step": 4, "eval/loss": 0.7, "eval/rewards/margins": 0.2},
        # a resumed run logged run step 4's evaluation again: the last one wins
        {"sdpo_step": 2, "step": 4, "run_step": 4, "eval/loss": 0.55, "eval/rewards/margins": 0.3},
        {"step": 9, "eval/loss": 9.0},  # an older record without run_step: left out
    ]
    points = _eval_curve(records)
    assert points["loss"] == [(2, 0.65), (4, 0.55)]
    assert points["rewards/margins"] == [(2, 0.1), (4, 0.3)]
    assert "rewards/accuracies" not in points

    fig = _draw_steps(_import_matplotlib(), records, random_reports(2, seed=7))
    loss_ax, acc_ax, margin_ax = fig.axes[:3]
    held = [ln for ln in loss_ax.get_lines() if ln.get_label().startswith("held-out")]
    assert len(held) == 1
    assert list(held[0].get_xdata()) == [2, 4]
    assert list(held[0].get_ydata()) == [0.65, 0.55]
    assert [ln.get_label() for ln in margin_ax.get_lines() if ln.get_label()[0] != "_"] == [
        "held-out (vs initial model)"
    ]
    assert not [ln for ln in acc_ax.get_lines() if ln.get_label().startswith("held-out")]


def wide_label_records() -> list[dict]:
    """Records whose y tick labels are as long as metrics get: a loss that barely moves
    (0.693146...), margins in the hundred thousands, accuracies small enough for a 1e-7
    multiplier; two sDPO steps with held-out points."""
    records = []
    for x in range(1, 41):
        sdpo_step = 1 + (x > 20)
        records.append(
            {
                "sdpo_step": sdpo_step,
                "step": x,
                "run_step": x,
                "loss": 0.6931472 - 1e-7 * x,
                "rewards/accuracies": 3e-7 * x,
                "rewards/margins": -123456.7 * x,
            }
        )
        if x % 20 == 0:
            records.append(
                {"sdpo_step": sdpo_step, "step": x, "run_step": x, "eval/loss": 0.693143}
            )
    return records


@pytest.mark.parametrize("case", ["wide_labels", "one_record"])
def test_plot_keeps_every_text_inside_the_figure_and_apart_from_the_other_panels(case):
    pytest.importorskip("matplotlib", reason="matplotlib (the `plot` extra) is not installed")
    from sdpo.report import _draw_steps, _import_matplotlib

    if case == "wide_labels":
        records, reports = wide_label_records(), random_reports(12, seed=8)
        for r in reports:  # gamma in the millions: the panel gets a "1e6" multiplier
            r.gamma_ref_chunk *= -1e5
    else:
        records = [{"sdpo_step": 1, "step": 1, "run_step": 1, "loss": 0.69}]
        records[0] |= {"rewards/accuracies": 1.0, "rewards/margins": 0.01}
        reports = random_reports(1, seed=9)
    fig = _draw_steps(_import_matplotlib(), records, reports)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    page = fig.bbox
    boxes = [ax.get_tightbbox(renderer) for ax in fig.axes]  # ticks, labels, title, legend
    for ax, box in zip(fig.axes, boxes):
        where = f"{ax.get_title()!r}: {box.extents} in {page.extents}"
        assert page.x0 <= box.x0 and box.x1 <= page.x1, where
        assert page.y0 <= box.y0 and box.y1 <= page.y1, where
        offset = ax.yaxis.offsetText
        if offset.get_text():
            assert not offset.get_window_extent(renderer).overlaps(
                ax.title.get_window_extent(renderer)
            ), where
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert not a.overlaps(b), (a.extents, b.extents)
    if case == "wide_labels":
        assert fig.axes[1].yaxis.offsetText.get_text() and fig.axes[3].yaxis.offsetText.get_text()


def test_plot_marks_a_sdpo_step_with_a_single_logged_record():
    pytest.importorskip("matplotlib", reason="matplotlib (the `plot` extra) is not installed")
    from sdpo.report import _draw_steps, _import_matplotlib

    metrics = {"loss": 0.69, "rewards/accuracies": 1.0, "rewards/margins": 0.01}
    records = [  # step 1 logged once (a line through one point draws nothing), step 2 twice
        {"sdpo_step": 1, "step": 1, "run_step": 1, **metrics},
        {"sdpo_step": 2, "step": 1, "run_step": 2, **metrics},
        {"sdpo_step": 2, "step": 2, "run_step": 3, **metrics},
    ]
    fig = _draw_steps(_import_matplotlib(), records, random_reports(2, seed=10))
    for ax in fig.axes[:3]:
        single, joined = ax.get_lines()[:2]
        assert list(single.get_xdata()) == [1] and single.get_marker() == "o"
        assert list(joined.get_xdata()) == [2, 3] and joined.get_marker() in ("None", None, "")
