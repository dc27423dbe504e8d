"""``python -m runtime serve`` and ``python -m runtime`` as a user meets them: ``--help`` with
every default and examples; bad arguments answered with one ``error:`` line and status 2, before
any work (no model loaded, no traceback)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from normport.runtime.__main__ import main as runtime_main
from normport.runtime.serve import cli

ROOT = Path(__file__).resolve().parents[2]


def _help_entries(text: str) -> dict[str, str]:
    """``--flag`` -> its help text, from argparse's option listing."""
    entries: dict[str, str] = {}
    flag = None
    for line in text.splitlines():
        match = re.match(r"^  (?:-\w, )?(--[\w-]+)", line)
        if match:
            flag = match.group(1)
            entries[flag] = line
        elif flag and line.startswith("    "):
            entries[flag] += " " + line.strip()
        else:
            flag = None
    return entries


def test_serve_help_shows_every_default_and_examples(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    entries = _help_entries(out)
    options = [a for a in cli._parser()._actions if a.option_strings and a.dest != "help"]
    assert len(options) > 10 and {a.option_strings[0] for a in options} <= set(entries)
    undocumented = [a.option_strings[0] for a in options if "default" not in
                    entries[a.option_strings[0]]]  # fmt: skip
    assert not undocumented, f"--help gives no default for {undocumented}"
    assert "(default: model_repository)" in entries["--repository"]
    assert "(default: 8000)" in entries["--port"]
    assert "examples:" in out and "python -m runtime serve --repository" in out


def test_runtime_help_lists_commands_and_examples(capsys) -> None:
    assert runtime_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("serve", "verify", "recalibrate"))
    assert "examples:" in out and "python -m runtime COMMAND --help" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "a command is required, one of serve, verify, recalibrate"),
        (["nope"], "unknown command 'nope', expected one of serve, verify, recalibrate"),
    ],
)
def test_runtime_rejects_a_missing_or_unknown_command(argv, message, capsys) -> None:
    assert runtime_main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines()[-1] == f"python -m runtime: error: {message}"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--repository", "{tmp}/missing"], r"argument --repository: '.*missing' is not a folder "
         r"\(no such path\); export one with `python -m export --all --out .*missing`"),
        (["--repository", "{tmp}/file"], r"argument --repository: '.*file' is a file, not a folder"),
        (["--port", "65536"], r"argument --port: must be a TCP port 0-65535 \(0: any free\), "
         r"got 65536"),
        (["--port", "-1"], r"argument --port: must be a TCP port 0-65535"),
        (["--port", "http"], r"argument --port: expected an integer, got 'http'"),
        (["--port-file", "{tmp}/missing/port"], r"argument --port-file: '.*missing/port': "
         r"folder '.*missing' does not exist"),
        (["--memory-budget", "lots"], r"argument --memory-budget: 'lots' is not a size"),
        (["--load-timeout", "soon"], r"argument --load-timeout: must be a number of seconds > 0, "
         r"got soon"),
        (["--busy-poll-us", "10001"], r"argument --busy-poll-us: must be 0-10000 microseconds "
         r"\(0: never\), got 10001"),
        (["--busy-poll-us", "-1"], r"argument --busy-poll-us: must be 0-10000 microseconds"),
        (["--busy-poll-us", "0.5"], r"argument --busy-poll-us: expected an integer, got '0.5'"),
    ],
)  # fmt: skip
def test_serve_rejects_bad_arguments_in_one_line(
    argv, message, tmp_path: Path, capsys, monkeypatch
) -> None:
    def no_work(*args, **kwargs):
        raise AssertionError("the server started work before checking its arguments")

    for name in ("create_app", "raise_fd_limit", "serve_until_signalled"):
        monkeypatch.setattr(cli, name, no_work)
    (tmp_path / "file").write_text("")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    with pytest.raises(SystemExit) as e:
        cli.main(["--repository", str(tmp_path), *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0].startswith("usage: python -m runtime serve"), err
    assert re.fullmatch(rf"python -m runtime serve: error: {message}.*", err[1]), err[1]


def test_default_repository_must_exist(tmp_path: Path) -> None:
    """No ``--repository`` and no ``model_repository/`` in the working folder: a real
    ``python -m runtime serve`` exits with status 2 and one ``error:`` line, no traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "runtime", "serve", "--port", "0"], cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        "python -m runtime serve: error: argument --repository: 'model_repository' is not a "
        "folder (no such path); export one with `python -m export --all --out model_repository`"
    )
