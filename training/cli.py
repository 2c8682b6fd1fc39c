"""What every command line of the project shares (import-light: load generators use it too)."""

from __future__ import annotations

import argparse
import dataclasses
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every CLI's --help: each flag's default after its help, unless it has none (None) or the help
    already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or "default:" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action) or ""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``prog: error: <what> (see prog --help)`` and exit status 2, not the
    whole usage block first (27 lines for ``train``) that hides the one line that matters. Subparsers
    made by ``add_subparsers`` are of the same class, so every subcommand answers the same way."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def from_args(cls: type[T], args: argparse.Namespace, **fixed) -> T:
    """The config dataclass ``cls`` from the parsed flags whose names are its fields (--max-int8-drop ->
    max_int8_drop): the one CLI-to-config step; ``fixed`` gives fields that are not flags."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names}, **fixed)
