"""The figures, inspected before they are saved: titles, axis labels with units, legends
outside the axes, and cells / bars that say what they are (exact 0, FAIL, ERR, CRASH, skip)."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import pytest

from normport.runtime.verify import plot_parity, plots
from normport.runtime.verify.divergence import BatchPoint, Divergence, StepsCurve
from normport.runtime.verify.parity import Cell, Check


def _cell(opset, mode, status, ratio=None, runtime="onnxruntime", subject="net"):
    checks = [] if ratio is None else [Check("y", 0, ratio * 1e-5, ratio, ratio, ratio <= 1)]
    return Cell(subject, "layer", opset, "float32", mode, runtime, 1e-5, 1e-5, status=status,
                reason=status, checks=checks)  # fmt: skip


CELLS = [
    _cell(17, "eval", "pass", 0.0),
    _cell(21, "eval", "pass", 0.25),
    _cell(17, "eval", "fail", 30.0, runtime="reference"),
    _cell(21, "eval", "skipped", runtime="reference"),
    _cell(17, "train", "error"),
    _cell(21, "train", "crash"),
]


def _div(name, curve, mates_eval=0.0, steps=()):
    points = [BatchPoint(b, m, m) for b, m in curve]
    return Divergence(name, "layer", name, 1.0, points, 0.5 if curve[0][1] else 0.0, mates_eval,
                      list(steps))  # fmt: skip


STEPS = StepsCurve(0.1, [0, 1, 10], [1.0, 0.5, 0.1], [0.8, 0.4, 0.1], [1.0, 0.5, 0.1])
DIVS = [
    _div("bn", [(1, 0.1), (16, 5e-3), (256, 1e-5)], steps=[STEPS]),
    _div("ln", [(1, 0.0), (16, 0.0), (256, 0.0)]),
]


@pytest.fixture
def figures(monkeypatch, tmp_path):
    drawn = {}

    def keep(fig, path):
        drawn[path.name] = fig

    monkeypatch.setattr(plot_parity, "save", keep)
    monkeypatch.setattr(plots, "save", keep)
    made = plots.draw(tmp_path, CELLS, DIVS, [])
    assert sorted(made) == sorted(f"plots/{name}" for name in drawn)
    yield drawn
    for fig in drawn.values():
        plt.close(fig)


def _texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def test_every_figure_has_titles_units_and_legends_outside_the_axes(figures):
    assert set(figures) == {
        "parity_float32.png", "divergence_batch_size.png", "divergence_steps.png",
        "batch_mates.png",
    }  # fmt: skip
    for name, fig in figures.items():
        data_axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
        for ax in data_axes:
            assert ax.get_title(), name
            assert "(" in ax.get_xlabel() or name.startswith("parity"), (name, ax.get_xlabel())
            assert ax.get_ylabel(), name
            assert ax.get_legend() is None, f"{name}: a legend inside the axes"
        assert fig.legends, name


def test_parity_colours_the_ratio_to_tolerance_and_names_every_status(figures):
    fig = figures["parity_float32.png"]
    ax = fig.axes[0]
    texts = _texts(ax)
    assert "0 (exact)" in texts and "0.25x" in texts and "FAIL 30x" in texts
    assert {"ERR", "CRASH", "skip"} <= set(texts)
    grid = ax.images[0].get_array()
    assert grid[0, 1] == pytest.approx(math.log10(0.25))  # eval / onnxruntime, opset 21
    assert grid[1, 0] == pytest.approx(math.log10(30.0))
    assert grid.mask[0, 0]  # the exact zero is no colour at -16: a hatched "0 (exact)" cell
    colorbar = fig.axes[1]
    assert "log10(max error / tolerance)" in colorbar.get_ylabel()
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert any(t.startswith("ERR") for t in legend) and any("CRASH" in t for t in legend)


def test_batch_size_plot_marks_where_the_model_agrees_within_tolerance(figures):
    fig = figures["divergence_batch_size.png"]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "bn (within tolerance: float16 from B=16, float32 from B=256)" in legend
    assert any("exactly (0) at every B: ln" in t for t in legend)
    ax = fig.axes[0]
    stars = [line for line in ax.get_lines() if line.get_marker() == "*"]
    assert [tuple(line.get_xdata()) for line in stars] == [(256,)]


def test_batch_mates_labels_exact_zeros_in_output_units(figures):
    ax = figures["batch_mates.png"].axes[0]
    assert "output units" in ax.get_xlabel()
    texts = _texts(ax)
    assert texts.count("eval mode: 0 (exact)") == 2 and "train mode: 0 (exact)" in texts
    widths = [bar.get_width() for bar in ax.patches]
    assert max(widths) > 0  # bn's train-mode bar is drawn


def test_steps_panels_are_titled(figures):
    titles = [ax.get_title() for ax in figures["divergence_steps.png"].axes]
    assert titles == [
        "Running mean vs data mean",
        "Running variance vs data variance",
        "Eval vs train output, held-out batch",
    ]


def test_saved_pngs_are_written(tmp_path):
    made = plots.draw(tmp_path, CELLS, DIVS, [])
    for path in made:
        assert (tmp_path / path).stat().st_size > 5000
