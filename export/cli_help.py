"""The help conventions of normport's command lines (``python -m export``, ``python -m
runtime verify``): defaults shown where an option has one, the epilog's examples as written."""

from __future__ import annotations

import argparse

__all__ = ["HelpFormatter", "parser"]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults, except the empty ones (None, False) of options that have none; keeps
    the epilog's lines."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def parser(prog: str, description: str, epilog: str) -> argparse.ArgumentParser:
    """An argument parser with :class:`HelpFormatter`."""
    return argparse.ArgumentParser(
        prog=prog, description=description, epilog=epilog, formatter_class=HelpFormatter
    )
