"""report.md and results.json from constructed cells with known numbers: the sentences come
only from what was measured for each model, the table gives absolute, relative and
x-tolerance errors, and error / crash / skipped cells are their own categories."""

from __future__ import annotations

import json

import pytest

from normport.runtime.verify import report
from normport.runtime.verify.divergence import BatchPoint, Divergence
from normport.runtime.verify.facts import SubjectFacts
from normport.runtime.verify.parity import Cell, Check

META = {
    "command": "python -m runtime verify",
    "torch": "t",
    "onnx": "o",
    "onnxruntime": "r",
    "opsets": [21],
    "steps": 2,
    "duration_s": 1.0,
    "subjects": [],
}


def _cell(subject, mode, status="pass", checks=(), reason="", runtime="onnxruntime"):
    return Cell(subject, "layer", 21, "float32", mode, runtime, 1e-5, 1e-5, status=status,
                reason=reason, checks=list(checks))  # fmt: skip


def _ok(quantity="output", step=0, max_abs=2e-6, max_rel=1e-6, ratio=0.1):
    return Check(quantity, step, max_abs, max_rel, ratio, True)


def _write(tmp_path, cells, facts, divs=()):
    data = report.write(tmp_path, cells, list(divs), META, [], facts)
    text = (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "results.json").read_text())["summary"] == data["summary"]
    return data, text


def _stateful_cells(name="bn"):
    train = [_ok(), _ok("running_mean", 1, 1e-6, 1e-6, 0.05), _ok("running_var", 1)]
    return [
        _cell(name, "eval", checks=[_ok()]),
        _cell(name, "eval", checks=[_ok()], runtime="reference"),
        _cell(name, "train", checks=train),
        _cell(name, "recalibrate", checks=[_ok(step=3)]),
    ]


def test_stateless_model_makes_no_running_statistics_or_recalibration_claim(tmp_path):
    cells = [
        _cell("ln", "eval", checks=[_ok()]),
        _cell("ln", "eval", checks=[_ok()], runtime="reference"),
    ]
    facts = [SubjectFacts("ln", "layer", modes_run=["eval"])]
    _, text = _write(tmp_path, cells, facts)
    assert "every running statistic" not in text
    assert "running statistics (" not in text and "after recalibration" not in text
    assert "fed-back steps" not in text
    assert "No layer keeps running statistics" in text
    assert "Random modules" not in text


def test_stateful_model_names_the_statistics_it_compared(tmp_path):
    facts = [SubjectFacts("bn", "layer", ["bn"], [], ["eval", "train", "recalibrate"], True)]
    _, text = _write(tmp_path, _stateful_cells(), facts)
    assert "training over 2 fed-back steps: outputs and 2 running statistics " \
        "(running_mean, running_var)" in text  # fmt: skip
    assert "outputs after recalibration" in text
    assert "No layer keeps running statistics" not in text


@pytest.mark.parametrize(
    ("random", "modes", "said"),
    [
        (["drop"], ("eval", "train"), True),
        ([], ("eval", "train"), False),
        (["drop"], ("eval",), False),
    ],
)
def test_dropout_sentence_only_when_dropout_was_disabled_for_train(tmp_path, random, modes, said):
    cells = [c for c in _stateful_cells() if c.mode in modes]
    facts = [SubjectFacts("bn", "layer", ["bn"], random, list(modes))]
    _, text = _write(tmp_path, cells, facts)
    assert ("Random modules (drop) were set to eval for the train-mode comparisons" in text) is said


def test_verdict_line_first_then_worst_against_tolerance(tmp_path):
    facts = [SubjectFacts("bn", "layer", ["bn"], [], ["eval", "train", "recalibrate"], True)]
    data, text = _write(tmp_path, _stateful_cells(), facts)
    section = text.split("### bn\n\n", 1)[1].splitlines()
    assert section[0].startswith("**bn: PASS: 4 cells within tolerance; worst 0.1x tolerance")
    assert section[2].startswith("- float32: worst 0.1x tolerance (rel 1.0e-06")
    entry = data["subjects"][0]
    assert entry["verdict"] == "PASS" and entry["reasons"] == ["4 cells within tolerance"]
    assert entry["stateful_layers"] == ["bn"] and entry["worst"]["ratio"] == 0.1


def test_table_gives_absolute_relative_and_ratio_per_cell(tmp_path):
    check = Check("output", 1, 3.5e-6, 7.0e-7, 0.25, True)
    cells = [_cell("ln", "eval", checks=[check, _ok(max_abs=1e-7, max_rel=2e-6, ratio=0.01)])]
    _, text = _write(tmp_path, cells, [SubjectFacts("ln", "layer", modes_run=["eval"])])
    assert (
        "| eval | onnxruntime | float32 | 21 | ok | 3.5e-06 | 2.0e-06 | 0.25 | output @ step 1 |"
        in text
    )
    assert "| ln | eval | onnxruntime | ok 0.25x |" in text  # the opset matrix


def test_error_and_crash_cells_are_their_own_category(tmp_path):
    cells = [
        _cell("bn", "eval", checks=[_ok()]),
        _cell("bn", "train", "error", reason="export failed: no Foo"),
        _cell("bn", "recalibrate", "crash", reason="onnxruntime killed by signal 11"),
    ]
    facts = [SubjectFacts("bn", "layer", ["bn"], [], ["eval"])]
    data, text = _write(tmp_path, cells, facts)
    total = data["summary"]
    assert (total["failed"], total["errors"], total["crashes"], total["skipped"]) == (0, 1, 1, 0)
    assert total["failed_cells"] == [] and total["verdict"] == "ERROR"
    assert total["error_cells"] == ["bn/train/onnxruntime/float32/opset21",
                                    "bn/recalibrate/onnxruntime/float32/opset21"]  # fmt: skip
    assert "**ERROR: 1 of 3 parity cells pass, 0 fail, 1 errors, 1 crashes, 0 skipped.**" in text
    assert "## Failing cells" not in text and "Skipped cells" not in text
    assert "| train | onnxruntime | float32 | 21 | ERR | | | | | export failed: no Foo |" in text
    assert "| CRASH | | | | | onnxruntime killed by signal 11 |" in text
    assert "Training is not compared: its cells could not run (ERR/CRASH)." in text
    assert data["subjects"][0]["reasons"] == [
        "cannot run in train (1 cell): export failed: no Foo",
        "crashed in recalibrate (1 cell): onnxruntime killed by signal 11",
    ]


def test_failed_cells_are_never_called_skipped(tmp_path):
    bad = Check("running_var", 0, 0.5, 0.4, 2e4, False)
    cells = [_cell("bn", "train", "fail", [bad], reason="running_var at step 0: ...")]
    data, text = _write(tmp_path, cells, [SubjectFacts("bn", "layer", ["bn"], [], ["train"])])
    assert data["summary"]["failed_cells"] == [cells[0].id]
    assert data["summary"]["skipped"] == 0 and "Skipped cells" not in text
    assert "| bn | train | onnxruntime | **FAIL** 2.0e+04x |" in text  # the matrix, not "skip"
    assert "| train | onnxruntime | float32 | 21 | **FAIL** | 0.5 | 0.4 | 2.0e+04 |" in text
    assert "## Failing cells" in text


def test_batch_size_answer_uses_the_models_eval_tolerance(tmp_path):
    # float32 layer tolerance: 1e-5 + 1e-5 * 1.0 = 2e-5; float16: 4e-3 + 4e-3 = 8e-3.
    curve = [BatchPoint(1, 0.1, 0.1), BatchPoint(16, 5e-3, 5e-3), BatchPoint(256, 1e-5, 1e-5)]
    div = Divergence("bn", "layer", "BatchNorm2d", 1.0, curve, 0.5, 0.0)
    facts = [SubjectFacts("bn", "layer", ["bn"], [], ["eval"])]
    _, text = _write(tmp_path, [_cell("bn", "eval", checks=[_ok()])], facts, [div])
    assert "within the float32 layer tolerance (2.0e-05) from batch 256" in text
    assert "within the float16 layer tolerance (0.008) from batch 16" in text
    assert "| bn | 0.1 | 0.005 | 1.0e-05 | B >= 256 | B >= 16 |" in text


def test_a_curve_still_above_tolerance_never_agrees(tmp_path):
    curve = [BatchPoint(1, 0.4, 0.4), BatchPoint(4, 0.2, 0.2)]
    div = Divergence("bn", "layer", "BatchNorm2d", 1.0, curve, 0.5, 0.0)
    _, text = _write(tmp_path, [], [SubjectFacts("bn", "layer", ["bn"])], [div])
    assert "not within the float16 layer tolerance (0.008) up to batch 4 (still 0.2 there" in text
    assert "| bn | 0.4 | 0.2 | never | never |" in text


def test_without_facts_the_cells_still_get_a_verdict_but_no_model_claims(tmp_path):
    data, text = _write(tmp_path, [_cell("ln", "eval", checks=[_ok()])], [])
    assert data["subjects"][0]["verdict"] == "PASS"
    assert "No layer keeps running statistics" not in text
