"""A small, strict reader and writer for the protobuf text-format subset of ``config.pbtxt``.

Grammar (anything else is a ``ValueError`` naming the line and column)::

    message := field*
    field   := IDENT ":" value | IDENT ":"? "{" message "}" | IDENT ":"? list
    list    := "[" [ value ("," value)* ] "]"
    value   := INT | STRING | IDENT | "{" message "}" | list      (no lists inside lists)

``IDENT`` values (enums such as ``TYPE_FP32``) come back as :class:`Enum`, quoted strings as
``str``; ``# comments`` run to the end of the line.  Floats, field separators (``;``) and
extensions are not part of the subset.

Error messages say where (``line 3, column 7:``) and what *kind* of token was expected and
found ("an identifier", "a quoted string"), never the text itself: a config may be any file an
operator points at, and its content must not reach a client through a parse error.
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
    column: int

    @property
    def where(self) -> str:
        return f"line {self.line}, column {self.column}"

    def describe(self) -> str:
        """What kind of token this is, without its text (punctuation is named by the grammar)."""
        if self.kind == "punct":
            return _PUNCT[self.text]
        return _KINDS[self.kind]


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
_KINDS = {
    "string": "a quoted string",
    "int": "an integer",
    "ident": "an identifier",
    "end": "the end of the file",
}
_PUNCT = {c: f"'{c}'" for c in "{}[]:,"}  # the grammar's own symbols, not file content
_INT64 = (-(2**63), 2**63 - 1)
_MAX_DEPTH = 32
_UNESCAPE = {'"': '"', "'": "'", "\\": "\\", "n": "\n", "t": "\t"}
_ESCAPE = {v: f"\\{k}" for k, v in _UNESCAPE.items() if k != "'"}


def quote(text: str) -> str:
    """``text`` as a double-quoted text-format string (``\\``, ``"``, newline, tab escaped)."""
    return '"' + "".join(_ESCAPE.get(c, c) for c in text) + '"'


def _unquote(token: _Token) -> str:
    out, chars = [], enumerate(token.text[1:-1], start=token.column + 1)
    for column, c in chars:
        if c == "\\":
            escaped = next(chars)[1]  # the token regex guarantees a character follows
            if escaped not in _UNESCAPE:
                raise ValueError(
                    f"line {token.line}, column {column}: unsupported escape sequence in a "
                    "quoted string (supported: \\\" \\' \\\\ \\n \\t)"
                )
            c = _UNESCAPE[escaped]
        out.append(c)
    return "".join(out)


def _unexpected(char: str) -> str:
    """What the text at a position no token matches looks like, without quoting it."""
    if char == '"':
        return "a quoted string not closed on its line"
    if char == "'":
        return "a single-quoted string (only double quotes are part of the subset)"
    if char in "+-.0123456789":
        return "a number that is not a plain integer (floats are not part of the subset)"
    if char == ";":
        return "a ';' separator (not part of the subset)"
    return "a character that is not part of the subset"


def _tokenize(text: str) -> list[_Token]:
    tokens, pos, line, line_start = [], 0, 1, 0
    while pos < len(text):
        column = pos - line_start + 1
        match = _TOKEN.match(text, pos)
        if match is None:
            raise ValueError(f"line {line}, column {column}: found {_unexpected(text[pos])}")
        kind, lexeme = match.lastgroup, match.group()
        # the length test first: int() of thousands of digits raises (or takes long)
        if kind == "int" and (len(lexeme) > 20 or not _INT64[0] <= int(lexeme) <= _INT64[1]):
            raise ValueError(f"line {line}, column {column}: integer outside the int64 range")
        if kind not in ("space", "comment"):
            tokens.append(_Token(kind, lexeme, line, column))
        if "\n" in lexeme:
            line += lexeme.count("\n")
            line_start = pos + lexeme.rfind("\n") + 1
        pos = match.end()
    tokens.append(_Token("end", "", line, pos - line_start + 1))
    return tokens


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = _tokenize(text)
        self.pos = 0
        self.depth = 0

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
                        f"{token.where}: end of the file inside the '{{' opened on {opened.where}"
                    )
                return Message(fields, 1)
            if self.is_punct("}"):
                if opened is None:
                    raise ValueError(f"{token.where}: '}}' without a matching '{{'")
                self.next()
                return Message(fields, opened.line)
            fields.append(self.field())

    def field(self) -> Field:
        name = self.next()
        if name.kind != "ident":
            raise ValueError(f"{name.where}: expected a field name, found {name.describe()}")
        if self.is_punct(":"):
            self.next()
        elif not (self.is_punct("{") or self.is_punct("[")):
            token = self.peek()
            raise ValueError(
                f"{token.where}: expected ':', '{{' or '[' after a field name, "
                f"found {token.describe()}"
            )
        return Field(name.text, self.value(in_list=False), name.line)

    def value(self, *, in_list: bool) -> Value:
        token = self.next()
        if token.kind == "int":
            return int(token.text)
        if token.kind == "string":
            return _unquote(token)
        if token.kind == "ident":
            return Enum(token.text)
        if token.kind == "punct" and token.text == "{":
            # a bound, so that a file of '{' is a ValueError and not a RecursionError
            if self.depth >= _MAX_DEPTH:
                raise ValueError(f"{token.where}: blocks nested deeper than {_MAX_DEPTH}")
            self.depth += 1
            message = self.message(token)
            self.depth -= 1
            return message
        if token.kind == "punct" and token.text == "[":
            if not in_list:
                return self.list(token)
            raise ValueError(f"{token.where}: found a list inside a list (not part of the subset)")
        raise ValueError(f"{token.where}: expected a value, found {token.describe()}")

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
                    f"{token.where}: expected ',' or ']' in the list opened on "
                    f"{opened.where}, found {token.describe()}"
                )


def parse(text: str) -> Message:
    """Parse text-format ``text`` into its top-level :class:`Message`.

    Raises:
        ValueError: syntax outside the subset; the message starts with
            ``line <n>, column <m>:`` and never quotes the text.
    """
    return _Parser(text).message(None)
