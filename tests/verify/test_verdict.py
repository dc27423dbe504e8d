"""The verdict word per subject: FAIL > ERROR > WARN > PASS, each with reasons from the cells
and facts, and the worst check against its tolerance."""

from __future__ import annotations

import pytest

from normport.export.batch_mates import BatchMates
from normport.runtime.verify.facts import SubjectFacts
from normport.runtime.verify.parity import Cell, Check
from normport.runtime.verify.verdict import verdict


def _cell(status="pass", *, ratio=0.1, mode="eval", opset=21, reason="", subject="net", q="y"):
    checks = [] if status in ("error", "crash", "skipped") else [
        Check(q, 1, ratio * 1e-5, ratio * 2e-5, ratio, ratio <= 1)
    ]  # fmt: skip
    return Cell(subject, "network", opset, "float16", mode, "onnxruntime", 1e-2, 1e-2,
                status=status, reason=reason, checks=checks)  # fmt: skip


def _facts(**kw) -> SubjectFacts:
    return SubjectFacts("net", "network", **kw)


def test_pass_line_names_count_and_worst_ratio_with_its_cell():
    cells = [_cell(ratio=0.05), _cell(ratio=0.31, mode="train", q="running_var"), _cell()]
    v = verdict(_facts(), cells)
    assert v.word == "PASS" and v.reasons == ["3 cells within tolerance"]
    assert v.worst.ratio == 0.31 and v.worst.quantity == "running_var"
    assert str(v) == (
        "net: PASS: 3 cells within tolerance; worst 0.31x tolerance "
        "(rel 6.2e-06, net/train/onnxruntime/float16/opset21 running_var)"
    )
    assert "\n" not in str(v)


def test_fail_counts_failures_and_worst_is_the_failing_check():
    cells = [_cell(ratio=0.2), _cell("fail", ratio=12.0, mode="train", reason="x"), _cell()]
    v = verdict(_facts(), cells)
    assert v.word == "FAIL"
    assert v.reasons[0] == "1 of 3 cells outside tolerance"
    assert v.worst.ratio == 12.0 and "worst 12x tolerance" in str(v)


def test_fail_outranks_error_and_both_are_named():
    cells = [_cell("fail", ratio=3.0), _cell("error", mode="train", reason="export failed: X")]
    v = verdict(_facts(), cells)
    assert v.word == "FAIL"
    assert "cannot run in train (1 cell): export failed: X" in v.reasons


@pytest.mark.parametrize(
    ("status", "words"),
    [("error", "cannot run in train (2 cells)"), ("crash", "crashed in train (2 cells)")],
)
def test_error_or_crash_without_failure_is_error_naming_mode_and_reason(status, words):
    cells = [_cell(), *[_cell(status, mode="train", reason="signal 11") for _ in range(2)]]
    v = verdict(_facts(), cells)
    assert v.word == "ERROR"
    assert v.reasons == [f"{words}: signal 11"]
    assert "outside tolerance" not in str(v)  # never counted as parity failures


def test_facts_errors_without_a_cell_are_reasons():
    v = verdict(_facts(errors=["train: export failed: no op"]), [_cell()])
    assert v.word == "ERROR" and v.reasons == ["train: export failed: no op"]


def test_batch_mate_dependence_warns():
    mates = BatchMates({"logits": 0.4, "h": 0.0}, ("logits",), 1e-6)
    v = verdict(_facts(batch_mates=mates), [_cell()])
    assert v.word == "WARN"
    assert (
        "eval outputs depend on batch-mates: logits (rel 0.4); dynamic batching would mix "
        "clients' requests"
    ) in v.reasons


def test_independent_batch_mates_stay_pass():
    mates = BatchMates({"logits": 0.0}, (), 1e-6)
    assert verdict(_facts(batch_mates=mates), [_cell()]).word == "PASS"


def test_skipped_cells_warn_and_are_not_passes():
    cells = [_cell(), _cell("skipped", reason="skipped: no kernel")]
    v = verdict(_facts(), cells)
    assert v.word == "WARN"
    assert v.reasons == ["1 cell within tolerance", "1 cell skipped, not passed: no kernel"]


def test_other_subjects_cells_are_ignored_and_no_cells_is_an_error():
    other = _cell("fail", ratio=9.0, subject="other")
    assert verdict(_facts(), [other, _cell()]).word == "PASS"
    empty = verdict(_facts(), [other])
    assert empty.word == "ERROR" and empty.reasons == ["no parity cell ran"]


def test_infinite_ratio_is_named_a_mismatch():
    cells = [_cell("fail", ratio=float("inf"))]
    assert "shape or non-finite mismatch" in str(verdict(_facts(), cells))
