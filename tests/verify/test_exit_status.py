"""``python -m runtime verify``'s exit status follows the report's verdict, and a model that
breaks the run (its factory raises) is reported, not a traceback: exit 2, the others verified."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from normport.runtime.verify import cli


def make_good() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6))
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(-0.5, 0.5)
    return net.eval(), torch.randn(4, 4)


def make_broken() -> tuple[nn.Module, torch.Tensor]:
    raise RuntimeError("the user's factory is broken")


FAST = ["--opset", "17", "--dtype", "float32", "--mode", "eval", "--no-divergence"]


def test_a_passing_run_exits_0(tmp_path: Path) -> None:
    argv = ["--module", f"{__name__}:make_good", *FAST, "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    assert json.loads((tmp_path / "results.json").read_text())["summary"]["verdict"] == "PASS"


def test_a_broken_factory_is_refused_before_any_work(tmp_path: Path, capsys) -> None:
    argv = ["--module", f"{__name__}:make_broken", f"{__name__}:make_good", *FAST]
    assert cli.main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "the user's factory is broken" in err and "Traceback" not in err
    assert not (tmp_path / "results.json").exists()


def test_a_subject_that_breaks_mid_run_is_an_error_not_a_traceback(
    tmp_path, capsys, monkeypatch
) -> None:
    """Whatever raises while one subject is verified (here: injected into the first one), the
    others are verified, the report is written, and the exit status is 2."""
    real = cli.verify_subject

    def first_breaks(subject, *args, **kwargs):
        if subject.name.endswith("make_good") and not calls:
            calls.append(subject.name)
            raise RuntimeError("broke while verifying")
        return real(subject, *args, **kwargs)

    calls: list[str] = []
    monkeypatch.setattr(cli, "verify_subject", first_breaks)
    argv = ["--module", f"{__name__}:make_good", "tests.verify.test_parity_truth:make_bert"]
    assert cli.main([*argv, *FAST, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "broke while verifying" in err and "Traceback" not in err
    data = json.loads((tmp_path / "results.json").read_text())
    assert any("broke while verifying" in p for p in data["meta"]["study_errors"])
    assert data["parity"] and all(c["status"] == "pass" for c in data["parity"])  # bert ran
    assert "Could not run" in (tmp_path / "report.md").read_text()


def test_no_cells_is_exit_2(tmp_path: Path) -> None:
    """Near miss of PASS: a stateless model asked for train mode only runs no cell at all."""
    argv = ["--module", f"{__name__}:make_good", "--opset", "17", "--dtype", "float32",
            "--mode", "train", "--no-divergence", "--out", str(tmp_path)]  # fmt: skip
    assert cli.main(argv) == 2
    assert json.loads((tmp_path / "results.json").read_text())["parity"] == []


def test_a_batch_mates_measurement_that_raises_is_reported(tmp_path: Path, monkeypatch) -> None:
    """Not measured is said in the report (not only in the progress log); parity still runs."""
    from normport.runtime.verify import matrix

    def refuse(module, batch):
        raise ValueError("cannot split this batch")

    monkeypatch.setattr(matrix.batch_mates, "measure", refuse)
    argv = ["--module", f"{__name__}:make_good", *FAST, "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    (subject,) = data["subjects"]
    assert subject["batch_mates"] is None
    assert subject["batch_mates_error"] == "ValueError: cannot split this batch"
    assert any("was not measured" in line for line in subject["reading"])
    assert "dynamic batching is not known to be safe" in (tmp_path / "report.md").read_text()
