"""README.md's command lines exist as written: every ``python -m MODULE [SUB]`` it mentions
answers ``--help`` with exit status 0 and lists every ``--flag`` README.md shows for it; every
``make TARGET`` it mentions is a Makefile target, and the ``python -m`` lines of that target's
recipe pass the same check.  Nothing is run but ``--help`` (no ``make``).

The export, verify and recalibrate CLIs are read at run time, so the check follows them as they
change; a flag README.md shows that a CLI lacks fails here, naming both.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys

import pytest

from tests.readme import MAKEFILE, README, ROOT, Command, commands, make_recipe_commands
from tests.readme import make_targets as readme_make_targets

TEXT = README.read_text()
COMMANDS, ORPHAN_FLAGS = commands(TEXT)
TARGETS = readme_make_targets(TEXT)
RECIPES = [
    (target, command)
    for _, target in TARGETS
    for command in make_recipe_commands(MAKEFILE.read_text(), target) or []
]


@functools.cache
def _help(argv: tuple[str, ...]) -> subprocess.CompletedProcess:
    path = [os.fspath(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    return subprocess.run(
        [sys.executable, "-m", *argv, "--help"], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip


def _check(command: Command, where: str) -> None:
    result = _help(tuple(command.argv))
    if result.returncode != 0:
        pytest.fail(
            f"{where}: `{command} --help` exits {result.returncode}:\n{result.stderr[-3000:]}",
            pytrace=False,
        )
    missing = [
        f"{flag} ({where.split(':')[0]}:{line})"
        for flag, line in command.flags.items()
        if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", result.stdout)
    ]
    assert not missing, f"`{command} --help` does not list {', '.join(missing)}"


def test_readme_mentions_the_commands() -> None:
    shown = {str(c) for c in COMMANDS}
    assert {"python -m export", "python -m runtime serve", "python -m runtime verify"} <= shown
    assert {"export", "test", "serve"} <= {t for _, t in TARGETS}


def test_every_flag_belongs_to_a_command() -> None:
    assert not ORPHAN_FLAGS, (
        f"README.md (line, flag) with no python -m command before them under the same heading: "
        f"{ORPHAN_FLAGS}"
    )


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c.argv) for c in COMMANDS])
def test_readme_command_exists_with_its_flags(command: Command) -> None:
    _check(command, f"README.md:{command.line}")


@pytest.mark.parametrize(("line", "target"), TARGETS, ids=[t for _, t in TARGETS])
def test_readme_make_target_exists(line: int, target: str) -> None:
    recipe = make_recipe_commands(MAKEFILE.read_text(), target)
    assert recipe is not None, f"README.md:{line}: `make {target}`: no such Makefile target"


@pytest.mark.parametrize(
    ("target", "command"), RECIPES, ids=[f"{t}-{' '.join(c.argv)}" for t, c in RECIPES]
)
def test_make_recipe_command_exists_with_its_flags(target: str, command: Command) -> None:
    _check(command, f"Makefile:{command.line} (make {target})")


SAMPLE = """\
## Serve

`python -m tool run --port 8000` (or `make run`), bounded by `--limit N`.

```sh
python -m tool other --out DIR   # a comment --not-a-flag
```

## Next

`--orphan`, and a wrapped `python -m tool run
--wrapped`.
"""


def test_parser_attributes_flags_to_the_command_before_them() -> None:
    found, orphans = commands(SAMPLE)
    flags = {str(c): set(c.flags) for c in found}
    assert flags == {
        "python -m tool run": {"--port", "--limit", "--wrapped"},
        "python -m tool other": {"--out"},
    }
    assert orphans == [(11, "--orphan")]
    assert readme_make_targets(SAMPLE) == [(3, "run")]
