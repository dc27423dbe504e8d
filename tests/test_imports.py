"""Ownership of contracts, checked on the source: no module imports a private (``_``) module of
a package it is not inside; and importing ``normport.export`` registers nothing and imports
neither torch nor onnxscript (each in a fresh interpreter)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "export", "runtime")


def _private_owner(module: str) -> str | None:
    """``normport.a._b.c`` -> ``normport.a`` (the package ``_b`` is private to); None if public."""
    parts = module.split(".")
    for i, part in enumerate(parts):
        if part.startswith("_") and not part.startswith("__"):
            return ".".join(parts[:i])
    return None


def violations(source: str, where: str, package: str) -> list[str]:
    """Imports in ``source`` (module ``where`` of ``package``) of private modules of other
    packages."""
    found = []
    for node in ast.walk(ast.parse(source, where)):
        modules: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.append(node.module)
            modules += [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            modules += [a.name for a in node.names]
        for module in modules:
            owner = _private_owner(module)
            if (
                owner
                and module.startswith("normport.")
                and not (package == owner or package.startswith(owner + "."))
            ):
                found.append(f"{where}:{node.lineno}: {module}")
    return found


def test_no_module_imports_another_packages_private_module() -> None:
    found = []
    for top in PACKAGES:
        for path in sorted((ROOT / top).rglob("*.py")):
            package = ".".join(("normport", *path.relative_to(ROOT).parent.parts))
            found += violations(path.read_text(), str(path.relative_to(ROOT)), package)
    assert not found, "\n".join(found)


@pytest.mark.parametrize(
    ("source", "package", "bad"),
    [
        ("from normport.export._emit import Emitter\n", "normport.runtime", True),
        ("from normport.runtime.recalibration import _feeds\n", "normport.runtime.verify", True),
        ("import normport.export._opset\n", "normport.models", True),
        ("from normport.export._emit import Emitter\n", "normport.export.lowerings", False),
        ("from normport.export.train_graph import state_pairs\n", "normport.runtime", False),
        ("from normport.export import __main__\n", "normport.runtime", False),
    ],
)
def test_the_scan_tells_private_from_public(source, package, bad) -> None:
    """Near misses: a subpackage may use its own package's private modules; dunders are public."""
    assert bool(violations(source, "probe.py", package)) is bad


_IMPORT_EXPORT = """
import sys
import onnx.defs
from normport import export  # noqa: F401
from normport.export import repository, train_graph, triton_config  # noqa: F401
print(",".join(m for m in ("torch", "onnxscript") if m in sys.modules))
print(onnx.defs.has("NormEval", "normport.placeholder"))
from normport.export._placeholder import translation_table
translation_table()
print(onnx.defs.has("NormEval", "normport.placeholder"))
"""


def test_importing_export_registers_nothing_and_needs_no_torch() -> None:
    done = subprocess.run([sys.executable, "-c", _IMPORT_EXPORT], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr
    imported, before, after = done.stdout.splitlines()
    assert imported == "", f"importing normport.export imported {imported}"
    assert (before, after) == ("False", "True")  # registered on first export, not on import


def test_every_package_folder_is_installed() -> None:
    """pyproject.toml lists packages by hand (the namespace maps folders): none may be missing
    or stale, or a wheel would lack it while the editable install still finds it."""
    import tomllib

    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(("normport", *p.parent.relative_to(ROOT).parts))
        for top in PACKAGES
        for p in (ROOT / top).rglob("__init__.py")
    }
    assert found - listed == set(), "packages missing from pyproject.toml"
    assert {p for p in listed if p.startswith("normport.")} - found == set(), "stale packages"
