"""A small, strict reader and writer for the protobuf text-format subset of ``config.pbtxt``.

Grammar (anything else is a ``ValueError`` naming the line)::

    message := field*
    field   := IDENT ":" value | IDENT ":"? "{" message "}" | IDENT ":"? list
    list    := "[" [ value ("," value)* ] "]"
    value   := INT | STRING | IDENT | "{" message "}" | list      (no lists inside lists)

``IDENT`` values (enums such as ``TYPE_FP32``) come back as :class:`Enum`, quoted strings as
``str``; ``# comments`` run to the end of the line.  Floats, field separators (``;``) and
extensions are not part of the subset.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple, TypeAlias

__all__ = ["Enum", "Field", "Message", "Value", "parse", "quote"]


class Enum(str):
    """An unquoted identifier value (``TYPE_FP32``), as opposed to a quoted string."""

    __slots__ = ()


@dataclass(frozen=True)
class Field:
    """One ``name: value`` (or ``name { ... }`` / ``name [ ... ]``) and its line."""

    name: str
    value: Value
    line: int


@dataclass(frozen=True)
class Message:
    """A ``{ ... }`` block (or the whole file): its fields in order, repeated names kept."""

    fields: list[Field]
    line: int


Value: TypeAlias = "int | str | Enum | list[Value] | Message"


class _Token(NamedTuple):
    kind: str  # "string" | "int" | "ident" | "punct" | "end"
    text: str
    line: int


_TOKEN = re.compile(
    r"""
    (?P<space>[ \t\r\n]+)
  | (?P<comment>\#[^\n]*)
  | (?P<string>"(?:[^"\\\n]|\\.)*")
  | (?P<int>[-+]?[0-9]+(?![\w.]))
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<punct>[{}\[\]:,])
    """,
    re.VERBOSE,
)
_UNESCAPE = {'"': '"', "'": "'", "\\": "\\", "n": "\n", "t": "\t"}
_ESCAPE = {v: f"\\{k}" for k, v in _UNESCAPE.items() if k != "'"}


def quote(text: str) -> str:
    """``text`` as a double-quoted text-format string (``\\``, ``"``, newline, tab escaped)."""
    return '"' + "".join(_ESCAPE.get(c, c) for c in text) + '"'


def _unquote(literal: str, line: int) -> str:
    out, chars = [], iter(literal[1:-1])
    for c in chars:
        if c == "\\":
            escaped = next(chars)  # the token regex guarantees a character follows
            if escaped not in _UNESCAPE:
                raise ValueError(f"line {line}: unsupported escape '\\{escaped}' in {literal}")
            c = _UNESCAPE[escaped]
        out.append(c)
    return "".join(out)


def _tokenize(text: str) -> list[_Token]:
    tokens, pos, line = [], 0, 1
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            bad = text[pos:].split(None, 1)[0][:20]
            raise ValueError(f"line {line}: unexpected {bad!r}")
        kind, lexeme = match.lastgroup, match.group()
        if kind not in ("space", "comment"):
            tokens.append(_Token(kind, lexeme, line))
        line += lexeme.count("\n")
        pos = match.end()
    tokens.append(_Token("end", "end of input", line))
    return tokens


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = _tokenize(text)
        self.pos = 0

    def peek(self) -> _Token:
        return self.tokens[self.pos]

    def next(self) -> _Token:
        token = self.tokens[self.pos]
        if token.kind != "end":
            self.pos += 1
        return token

    def is_punct(self, text: str) -> bool:
        token = self.peek()
        return token.kind == "punct" and token.text == text

    def message(self, opened: _Token | None) -> Message:
        fields: list[Field] = []
        while True:
            token = self.peek()
            if token.kind == "end":
                if opened is not None:
                    raise ValueError(
                        f"line {token.line}: end of input inside the '{{' opened on line "
                        f"{opened.line}"
                    )
                return Message(fields, 1)
            if self.is_punct("}"):
                if opened is None:
                    raise ValueError(f"line {token.line}: '}}' without a matching '{{'")
                self.next()
                return Message(fields, opened.line)
            fields.append(self.field())

    def field(self) -> Field:
        name = self.next()
        if name.kind != "ident":
            raise ValueError(f"line {name.line}: expected a field name, got {name.text!r}")
        if self.is_punct(":"):
            self.next()
        elif not (self.is_punct("{") or self.is_punct("[")):
            token = self.peek()
            raise ValueError(
                f"line {token.line}: expected ':', '{{' or '[' after {name.text!r}, "
                f"got {token.text!r}"
            )
        return Field(name.text, self.value(in_list=False), name.line)

    def value(self, *, in_list: bool) -> Value:
        token = self.next()
        if token.kind == "int":
            return int(token.text)
        if token.kind == "string":
            return _unquote(token.text, token.line)
        if token.kind == "ident":
            return Enum(token.text)
        if token.text == "{":
            return self.message(token)
        if token.text == "[" and not in_list:
            return self.list(token)
        raise ValueError(f"line {token.line}: expected a value, got {token.text!r}")

    def list(self, opened: _Token) -> list[Value]:
        items: list[Value] = []
        if self.is_punct("]"):
            self.next()
            return items
        while True:
            items.append(self.value(in_list=True))
            token = self.next()
            if token.text == "]" and token.kind == "punct":
                return items
            if token.text != "," or token.kind != "punct":
                raise ValueError(
                    f"line {token.line}: expected ',' or ']' in the list opened on line "
                    f"{opened.line}, got {token.text!r}"
                )


def parse(text: str) -> Message:
    """Parse text-format ``text`` into its top-level :class:`Message`.

    Raises:
        ValueError: syntax outside the subset; the message starts with ``line <n>:``.
    """
    return _Parser(text).message(None)
