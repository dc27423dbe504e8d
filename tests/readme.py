"""What README.md shows a reader: its python blocks, the command lines it mentions (``python -m``
in sh blocks and inline code, ``make`` targets) and the dotted names it uses.

Flags are attributed to a command the way a reader would: those on the command's own line go
with it, and a ``--flag`` in other inline code (the serve limits table, "with --batch-size")
goes with the last command mentioned before it under the same heading.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAKEFILE = ROOT / "Makefile"

__all__ = [
    "MAKEFILE",
    "README",
    "ROOT",
    "Block",
    "Command",
    "commands",
    "dotted_names",
    "fenced_blocks",
    "make_recipe_commands",
    "make_targets",
]

_FENCE = re.compile(r"^```(\w*)\s*$")
_SPAN = re.compile(r"`([^`]+)`")
_PYTHON_M = re.compile(r"python -m ([\w.]+)((?:\s+[a-z][\w-]*)?)")
_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
_MAKE = re.compile(r"^make ([\w-]+)")
_DOTTED = re.compile(r"^((?:models|export|runtime)(?:\.[A-Za-z_]\w*)+)(?:\(.*)?$")
_DOTTED_IN_CODE = re.compile(r"(?<![\w.])((?:models|export|runtime)(?:\.[A-Za-z_]\w*)+)")


@dataclass(frozen=True)
class Block:
    """A fenced block: its language and code, ``line`` the README line of its first code line."""

    lang: str
    line: int
    code: str


@dataclass
class Command:
    """``python -m module [sub]`` and the flags README.md shows for it, with their lines."""

    module: str
    sub: str | None
    line: int
    flags: dict[str, int] = field(default_factory=dict)

    @property
    def argv(self) -> list[str]:
        return [self.module, *([self.sub] if self.sub else [])]

    def __str__(self) -> str:
        return "python -m " + " ".join(self.argv)


def fenced_blocks(text: str) -> list[Block]:
    blocks, lang, start, body = [], None, 0, []
    for number, line in enumerate(text.splitlines(), 1):
        fence = _FENCE.match(line)
        if lang is None and fence:
            lang, start, body = fence.group(1), number + 1, []
        elif lang is not None and line.startswith("```"):
            blocks.append(Block(lang, start, "\n".join(body) + "\n"))
            lang = None
        elif lang is not None:
            body.append(line)
    return blocks


def _pieces(text: str) -> list[tuple[int, str, bool]]:
    """``(line, text, is_heading)`` in reading order: headings, sh-block lines (comments cut)
    and inline code spans (which may wrap over a line break), fenced code of other languages
    left out."""
    lines = text.splitlines()
    prose = list(lines)
    pieces: list[tuple[int, str, bool]] = []
    for block in fenced_blocks(text):
        first = block.line - 1  # the opening fence, 1-based
        for i in range(first - 1, block.line + block.code.count("\n")):
            prose[i] = ""  # keep the line count: offsets still map to README lines
        if block.lang == "sh":
            for i, line in enumerate(block.code.splitlines()):
                pieces.append((block.line + i, line.split("#", 1)[0].strip(), False))
    joined = "\n".join(prose)
    for number, line in enumerate(prose, 1):
        if line.startswith("#"):
            pieces.append((number, line, True))
    for span in _SPAN.finditer(joined):
        line = joined.count("\n", 0, span.start()) + 1
        pieces.append((line, " ".join(span.group(1).split()), False))
    return sorted(pieces, key=lambda p: (p[0], not p[2]))


def commands(text: str) -> tuple[list[Command], list[tuple[int, str]]]:
    """Every ``python -m`` command README.md mentions (one per module and subcommand, flags
    merged), and the ``(line, flag)`` pairs no command could claim."""
    found: dict[tuple[str, str | None], Command] = {}
    orphans: list[tuple[int, str]] = []
    current: Command | None = None
    for line, piece, heading in _pieces(text):
        if heading:
            current = None
            continue
        match = _PYTHON_M.search(piece)
        if match:
            module, sub = match.group(1), match.group(2).strip() or None
            current = found.setdefault((module, sub), Command(module, sub, line))
            piece = piece[match.end() :]
        for flag in _FLAG.findall(piece):
            if current is None:
                orphans.append((line, flag))
            else:
                current.flags.setdefault(flag, line)
    return list(found.values()), orphans


def make_targets(text: str) -> list[tuple[int, str]]:
    """``(line, target)`` for every ``make TARGET`` README.md mentions, first mention only."""
    seen: dict[str, int] = {}
    for line, piece, heading in _pieces(text):
        match = None if heading else _MAKE.match(piece)
        if match:
            seen.setdefault(match.group(1), line)
    return [(line, target) for target, line in seen.items()]


def make_recipe_commands(makefile: str, target: str) -> list[Command] | None:
    """The ``$(PY) -m module ...`` lines of ``target``'s recipe (``None``: no such target)."""
    lines = makefile.splitlines()
    heads = [i for i, line in enumerate(lines) if re.match(rf"^{re.escape(target)}\s*:", line)]
    if not heads:
        return None
    found = []
    for i in range(heads[0] + 1, len(lines)):
        if not lines[i].startswith("\t"):
            break
        match = re.search(r"-m ([\w.]+)((?:\s+[a-z][\w-]*)?)", lines[i])
        if match:
            command = Command(match.group(1), match.group(2).strip() or None, i + 1)
            for flag in _FLAG.findall(lines[i][match.end() :]):
                command.flags.setdefault(flag, i + 1)
            found.append(command)
    return found


def dotted_names(text: str) -> list[tuple[int, str]]:
    """``(line, name)`` for each Python attribute of ``models``, ``export`` or ``runtime`` that
    inline code or a python block names (``models.zoo.get(name)`` gives ``models.zoo.get``)."""
    seen: dict[str, int] = {}
    for line, piece, heading in _pieces(text):
        match = None if heading else _DOTTED.match(piece)
        if match:
            seen.setdefault(match.group(1), line)
    for block in fenced_blocks(text):
        if block.lang == "python":
            for i, code in enumerate(block.code.splitlines()):
                for name in _DOTTED_IN_CODE.findall(code.split("#", 1)[0]):
                    seen.setdefault(name, block.line + i)
    return [(line, name) for name, line in seen.items()]
