"""Loading rules: what makes a model folder UNAVAILABLE (with which reason), and providers."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from normport.runtime.serve.repository import READY, UNAVAILABLE, Repository
from normport.runtime.serve.session import choose_providers


def _symlink_outside(folder: Path, outside: Path) -> None:
    (outside / "model.onnx").write_bytes((folder / "1" / "model.onnx").read_bytes())
    (folder / "1" / "model.onnx").unlink()
    (folder / "1" / "model.onnx").symlink_to(outside / "model.onnx")


def _no_config(folder: Path, outside: Path) -> None:
    (folder / "config.pbtxt").unlink()


def _no_version(folder: Path, outside: Path) -> None:
    shutil.rmtree(folder / "1")


def _renamed(folder: Path, outside: Path) -> None:
    text = (folder / "config.pbtxt").read_text()
    (folder / "config.pbtxt").write_text(text.replace('name: "m"', 'name: "other"'))


def _other_platform(folder: Path, outside: Path) -> None:
    text = (folder / "config.pbtxt").read_text()
    (folder / "config.pbtxt").write_text(text.replace("onnxruntime_onnx", "tensorrt_plan"))


def _empty_file(folder: Path, outside: Path) -> None:
    (folder / "1" / "model.onnx").write_bytes(b"")


def _version_without_model(folder: Path, outside: Path) -> None:
    (folder / "2").mkdir()


BREAKAGES: dict[str, tuple[Callable[[Path, Path], None], str, str]] = {
    # name -> (how to break model "m", version in the index, reason regex)
    "symlink-outside": (_symlink_outside, "1", r"model\.onnx resolves outside the model folder"),
    "no-config": (_no_config, "", r"no config\.pbtxt"),
    "no-version": (_no_version, "", r"no version folder"),
    "config-name": (_renamed, "", r"the name in config\.pbtxt differs from the folder name"),
    "platform": (_other_platform, "", r"the platform in config\.pbtxt is not 'onnxruntime_onnx'"),
    "empty-file": (_empty_file, "1", r"corrupt or truncated model file: no graph"),
    "version-without-model": (_version_without_model, "2", r"no model\.onnx in version folder 2"),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_broken_model_is_unavailable_and_the_rest_load(
    repo_root: Path, tmp_path: Path, breakage: str
) -> None:
    root, outside = tmp_path / "repo", tmp_path / "outside"
    outside.mkdir()
    shutil.copytree(repo_root / "t_fp32", root / "m")
    text = (root / "m" / "config.pbtxt").read_text()
    (root / "m" / "config.pbtxt").write_text(text.replace('"t_fp32"', '"m"'))
    shutil.copytree(repo_root / "t_int8", root / "t_int8")
    break_, version, reason = BREAKAGES[breakage]
    break_(root / "m", outside)
    index = {(e["name"], e["version"]): e for e in Repository(root).index()}
    entry = index[("m", version)]
    assert entry["state"] == UNAVAILABLE and re.search(reason, entry["reason"]), entry
    assert str(tmp_path) not in entry["reason"]
    assert index[("t_int8", "1")]["state"] == READY


def test_a_missing_repository_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is not a folder"):
        Repository(tmp_path / "missing")


@pytest.mark.parametrize(
    ("available", "chosen"),
    [
        (["CPUExecutionProvider"], ["CPUExecutionProvider"]),
        (["AzureExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"]),
        (
            ["CUDAExecutionProvider", "CPUExecutionProvider"],
            ["CUDAExecutionProvider", "CPUExecutionProvider"],
        ),
    ],
)
def test_cuda_first_when_available(available: list[str], chosen: list[str]) -> None:
    assert choose_providers(available) == chosen
